"""Protobuf wire format, the little we read by hand: a message's top-level fields, to cut its large byte
fields out before protobuf parses (and copies) the rest. Imports no generated code (tritonclient registers
the same `inference.*` message names in protobuf's default pool)."""

from __future__ import annotations

RAW_INPUT_CONTENTS = 7  # ModelInferRequest's field number


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def split_field(message: memoryview, number: int) -> tuple[bytes, list[memoryview]]:
    """Protobuf wire bytes -> (the message without the top-level length-delimited field `number`, that
    field's values as views of `message`, in order). A walk over the top-level fields only."""
    rest = bytearray()
    found: list[memoryview] = []
    i, n = 0, len(message)
    while i < n:
        start = i
        key, i = _varint(message, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(message, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            size, i = _varint(message, i)
            if key >> 3 == number:
                if i + size > n:
                    break
                found.append(message[i : i + size])
                i += size
                continue
            i += size
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        rest += message[start:i]
    if i != n:
        raise ValueError("truncated message")
    return bytes(rest), found


def field_start(prefix: memoryview, number: int) -> int | None:
    """Where the first value of the top-level length-delimited field `number` starts in a message of which
    only `prefix` has arrived; None when its key and length are not in `prefix` (or the bytes are not a
    message)."""
    i, n = 0, len(prefix)
    try:
        while i < n:
            key, i = _varint(prefix, i)
            wire = key & 7
            if wire == 0:
                _, i = _varint(prefix, i)
            elif wire == 1:
                i += 8
            elif wire == 2:
                size, i = _varint(prefix, i)
                if key >> 3 == number:
                    return i if i <= n else None
                i += size
            elif wire == 5:
                i += 4
            else:
                return None
    except (IndexError, ValueError):
        return None
    return None
