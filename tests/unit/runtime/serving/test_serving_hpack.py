"""Our HPACK decoder (protocol/hpackdec.py) against the `hpack` package's, block by block on one connection's
worth of blocks: the same fields, the same dynamic table (later blocks index into it), and an error from one
exactly when the other errs. Deterministic seeds; the blocks come from `hpack.Encoder` (incremental indexing,
Huffman when shorter, never-indexed fields, table size changes) and then from the same blocks mutated."""

from __future__ import annotations

import random

import pytest
from hpack import Decoder as Reference
from hpack import Encoder, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError, InvalidTableSizeError, OversizedHeaderListError

from runtime.serving.protocol.hpackdec import Decoder

NAMES = [":method", ":path", ":authority", "content-type", "grpc-timeout", "user-agent", "te", "x-trace"]
NAMES.append("ünï")  # UTF-8 names and values too


def _fields(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for _ in range(rng.randint(0, 9)):
        name = rng.choice(NAMES) if rng.random() < 0.8 else "x-" + "".join(rng.choices("abcdef", k=5))
        value = rng.choice(["POST", "/a.B/C", "application/grpc", "trailers", "é€", ""])
        if rng.random() < 0.5:
            value = f"{rng.randint(0, 10**9)}u" if rng.random() < 0.6 else "v" * rng.randint(0, 5000)
        field = (name, value)
        out.append(NeverIndexedHeaderTuple(*field) if rng.random() < 0.1 else field)
    return out


def _decode(decoder: Reference | Decoder, block: bytes) -> list[tuple[str, str]] | type:
    try:
        return [tuple(f) for f in decoder.decode(block)]  # type: ignore[misc]
    except HPACKError as e:
        return HPACKError if not isinstance(e, InvalidTableSizeError | OversizedHeaderListError) else type(e)


def _same_tables(ours: Decoder, ref: Reference) -> None:
    """Every dynamic index (and two past the end) reads the same field from both, or fails in both: one
    indexed field per block, which reads the table without changing it."""
    for idx in range(62, 62 + len(ref.header_table.dynamic_entries) + 2):
        probe = bytes([0x80 | idx]) if idx < 0x7F else bytes([0xFF, idx - 0x7F])
        assert _decode(ours, probe) == _decode(ref, probe), idx


@pytest.mark.parametrize("seed", range(40))
def test_our_decoder_gives_what_hpacks_gives_for_a_connections_blocks(seed: int) -> None:
    """The same fields, and after each block the same dynamic table entry by entry: evictions, entries
    larger than the table (which empty it) and size updates included."""
    rng = random.Random(seed)
    enc = Encoder()
    ours, ref = Decoder(max_header_list_size=8192), Reference()
    ref.max_header_list_size = 8192
    for n in range(60):
        if rng.random() < 0.1:  # the encoder shrinks or grows its table (a size update opens its next block)
            enc.header_table_size = rng.choice([0, 64, 256, 4096])
        block = enc.encode(_fields(rng))
        want, got = _decode(ref, block), _decode(ours, block)
        assert got == want, (seed, n, block)
        if isinstance(want, type):  # the connection would end here
            break
        _same_tables(ours, ref)


@pytest.mark.parametrize("seed", range(300))
def test_mutated_blocks_fail_in_ours_exactly_when_they_fail_in_hpacks(seed: int) -> None:
    """Flipped, cut and inserted bytes: whatever hpack makes of a block, ours makes the same, or both fail."""
    rng = random.Random(seed)
    enc = Encoder()
    ours, ref = Decoder(max_header_list_size=8192), Reference()
    ref.max_header_list_size = 8192
    for n in range(8):
        block = bytearray(enc.encode(_fields(rng)))
        for _ in range(rng.randint(0, 3)):
            if not block:
                break
            at = rng.randrange(len(block))
            what = rng.random()
            if what < 0.4:
                block[at] ^= 1 << rng.randrange(8)
            elif what < 0.7:
                del block[at:]
            else:
                block.insert(at, rng.randrange(256))
        want, got = _decode(ref, bytes(block)), _decode(ours, bytes(block))
        assert got == want, (seed, n, bytes(block))
        if isinstance(want, type):
            break
        _same_tables(ours, ref)


def test_limits_the_settings_set() -> None:
    """A size update beyond what we allow, a table not shrunk to a new allowance, a header list over the
    limit, an index past the table: each an error (the connection's end), as RFC 7541 and 9113 ask."""
    enc = Encoder()
    enc.header_table_size = 8192
    d = Decoder()
    with pytest.raises(InvalidTableSizeError):
        d.decode(enc.encode([("a", "b")]))
    d = Decoder()
    d.max_allowed_table_size = 0  # our SETTINGS lowered it; the encoder did not follow
    with pytest.raises(InvalidTableSizeError):
        d.decode(Encoder().encode([("a", "b")]))
    d = Decoder(max_header_list_size=100)
    with pytest.raises(OversizedHeaderListError):
        d.decode(Encoder().encode([("x", "v" * 100)]))
    with pytest.raises(HPACKError):
        Decoder().decode(b"\xbe")  # index 62: the dynamic table is empty
    with pytest.raises(HPACKError):
        Decoder().decode(b"\x82\x3f\xe1\x1f")  # a size update after a field
    assert Decoder().decode(b"\x82\x86") == [(":method", "GET"), (":scheme", "http")]


def test_what_the_decoder_remembers_stays_small_whatever_a_client_sends() -> None:
    """Long literals (here 600 distinct values of 4 KB) are decoded but not remembered: a client cannot make
    a connection's memory of decoded strings grow past its bound."""
    from runtime.serving.protocol import hpackdec

    d = Decoder(max_header_list_size=1 << 20)
    enc = Encoder()
    for i in range(600):
        value = f"{i:04d}" + "v" * 4096
        assert d.decode(enc.encode([("x-big", value), ("x-small", str(i % 7))])) == [
            ("x-big", value),
            ("x-small", str(i % 7)),
        ]
    kept = sum(len(k) + len(v[0]) for k, v in d._strings.items())
    assert len(d._strings) <= hpackdec._MAX_STRINGS and kept <= 2 * 256 * hpackdec._MAX_STRINGS
