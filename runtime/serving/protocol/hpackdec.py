"""HPACK decoding (RFC 7541) for our HTTP/2 layer: what the `hpack` package's Decoder does, in one loop.

Every gRPC call starts with a header block. A block of one-byte indexed fields reads the table without
changing it, and http2.py remembers its result; but a client with a deadline (grpc-go, ...) sends its
`grpc-timeout` as a new literal each call, inserted into the dynamic table, which shifts every index the next
block uses: no two blocks alike, and `hpack.Decoder` took 18.5 µs for each of them (8 fields; a method call
and a memoryview per field). This decoder walks the block once, with the static table pre-decoded and the
literal strings it has decoded remembered by their bytes (Huffman decoding is most of a literal's cost, and
the same strings come back call after call). The `hpack` package still does the Huffman decoding, and its
exception classes are raised for the same faults: a test decodes random blocks with both and compares.
bench/http2_bench.py times both (ours: 4.7 µs for that block).
"""

from __future__ import annotations

from collections import deque

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

DEFAULT_TABLE_SIZE = 4096
# (name, value, the name's octets, the entry's size: RFC 7541 4.1)
_Entry = tuple[str, str, int, int]
_STATIC: tuple[_Entry, ...] = tuple(
    (n.decode(), v.decode(), len(n), len(n) + len(v) + 32) for n, v in HeaderTable.STATIC_TABLE
)
_STATIC_LEN = len(_STATIC)
_MAX_STRINGS = 512  # decoded literals remembered...
_MAX_STRING_BYTES = 256  # ...if no longer than this: at most 128 KiB a connection, whatever a client sends
_MAX_INT = 1 << 32  # larger integers are an attack, not a header


class Decoder:
    """One connection's HPACK decoding state: the dynamic table and its limits. `max_header_list_size`: the
    most a block may decode to (RFC 9113's SETTINGS_MAX_HEADER_LIST_SIZE: names, values and 32 per field)."""

    def __init__(self, max_header_list_size: int = 1 << 16) -> None:
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE  # our SETTINGS_HEADER_TABLE_SIZE
        self.table_size = DEFAULT_TABLE_SIZE  # the encoder's current choice (size updates)
        self._dynamic: deque[_Entry] = deque()  # newest first: index 62 is [0]
        self._used = 0
        self._strings: dict[bytes, tuple[str, int]] = {}

    def decode(self, data: bytes) -> list[tuple[str, str]]:
        """A header block's fields, in order (HPACKDecodingError and its kin on a malformed block, after
        which the table is not to be trusted: the connection ends)."""
        data = bytes(data)  # (a no-op for bytes) its slices key the literals remembered
        out: list[tuple[str, str]] = []
        i, end, listed = 0, len(data), 0
        while i < end:
            b = data[i]
            i += 1
            if b & 0x80:  # indexed field
                idx = b & 0x7F
                if idx == 0x7F:
                    idx, i = _integer(data, i, idx)
                name, value, _, size = self._get(idx)
            elif b & 0x40 or not b & 0x20:  # a literal: with incremental indexing, without, never indexed
                mask = 0x3F if b & 0x40 else 0x0F
                idx = b & mask
                if idx == mask:
                    idx, i = _integer(data, i, idx)
                if idx:
                    name, _, name_octets, _ = self._get(idx)
                else:
                    name, name_octets, i = self._string(data, i)
                value, value_octets, i = self._string(data, i)
                size = name_octets + value_octets + 32
                if b & 0x40:
                    self._add((name, value, name_octets, size))
            else:  # dynamic table size update: only before the first field
                if out:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                new = b & 0x1F
                if new == 0x1F:
                    new, i = _integer(data, i, new)
                if new > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.table_size = new
                self._evict()
                continue
            listed += size
            if listed > self.max_header_list_size:
                raise OversizedHeaderListError(
                    f"A header list larger than {self.max_header_list_size} has been received"
                )
            out.append((name, value))
        if self.table_size > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        return out

    def _get(self, idx: int) -> _Entry:
        if 0 < idx <= _STATIC_LEN:
            return _STATIC[idx - 1]
        d = idx - _STATIC_LEN - 1
        if idx and d < len(self._dynamic):
            return self._dynamic[d]
        raise InvalidTableIndexError(f"Invalid table index {idx}")

    def _string(self, data: bytes, i: int) -> tuple[str, int, int]:
        """The string literal at `i`: (text, its length in octets once decoded, where the next one starts)."""
        if i >= len(data):
            raise HPACKDecodingError("Header block truncated in a string literal")
        b = data[i]
        n, j = b & 0x7F, i + 1
        if n == 0x7F:
            n, j = _integer(data, j, n)
        k = j + n
        if k > len(data):
            raise HPACKDecodingError("Header block truncated in a string literal")
        raw = data[i:k]
        hit = self._strings.get(raw)
        if hit is not None:
            return hit[0], hit[1], k
        octets = decode_huffman(data[j:k]) if b & 0x80 else data[j:k]
        try:
            text = octets.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HPACKDecodingError("Unable to decode headers as UTF-8") from e
        if k - i <= _MAX_STRING_BYTES:
            if len(self._strings) >= _MAX_STRINGS:
                self._strings.clear()
            self._strings[raw] = (text, len(octets))
        return text, len(octets), k

    def _add(self, entry: _Entry) -> None:
        if entry[3] > self.table_size:  # larger than the table: the table empties, nothing is added
            self._dynamic.clear()
            self._used = 0
            return
        self._dynamic.appendleft(entry)
        self._used += entry[3]
        self._evict()

    def _evict(self) -> None:
        while self._used > self.table_size:
            self._used -= self._dynamic.pop()[3]


def _integer(data: bytes, i: int, value: int) -> tuple[int, int]:
    """The rest of an integer whose prefix was all ones (`value`), from byte `i` on: (integer, next byte)."""
    shift = 0
    while True:
        if i >= len(data):
            raise HPACKDecodingError("Header block truncated in an integer")
        b = data[i]
        i += 1
        value += (b & 0x7F) << shift
        if value >= _MAX_INT:
            raise HPACKDecodingError("Integer too large in a header block")
        if not b & 0x80:
            return value, i
        shift += 7
