"""Protobuf wire format, the little we read by hand: a message's top-level fields, to cut its large byte
fields out before protobuf parses (and copies) the rest. Imports no generated code (tritonclient registers
the same `inference.*` message names in protobuf's default pool)."""

from __future__ import annotations

from collections.abc import Iterator

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


def fields(message: memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, where its key starts, where its value starts, where it ends) for each top-level
    field in turn; a length-delimited field's value is its payload. The last one may end past `message`."""
    i, n = 0, len(message)
    while i < n:
        start = i
        key, i = _varint(message, i)
        wire = key & 7
        if wire == 0:
            _, end = _varint(message, i)
        elif wire == 1:
            end = i + 8
        elif wire == 2:
            size, i = _varint(message, i)
            end = i + size
        elif wire == 5:
            end = i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield key >> 3, wire, start, i, end
        i = end


def split_field(message: memoryview, number: int) -> tuple[bytes, list[memoryview]]:
    """Protobuf wire bytes -> (the message without the top-level length-delimited field `number`, that
    field's values as views of `message`, in order). A walk over the top-level fields only."""
    rest = bytearray()
    found: list[memoryview] = []
    for field, wire, start, value, end in fields(message):
        if end > len(message):
            raise ValueError("truncated message")
        if field == number and wire == 2:
            found.append(message[value:end])
        else:
            rest += message[start:end]
    return bytes(rest), found


def field_start(prefix: memoryview, number: int) -> int | None:
    """Where the first value of the top-level length-delimited field `number` starts in a message of which
    only `prefix` has arrived; None when its key and length are not in `prefix` (or the bytes are not a
    message)."""
    try:
        for field, wire, _, value, _ in fields(prefix):
            if field == number and wire == 2:
                return value if value <= len(prefix) else None
    except (IndexError, ValueError):
        return None
    return None
