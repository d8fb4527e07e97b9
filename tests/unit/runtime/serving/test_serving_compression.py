"""protocol.compression: compressed request bodies and messages inflated within the payload limit and the
process's request-bytes budget."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest

from runtime.serving.protocol.compression import CompressionError, inflate
from runtime.serving.protocol.http1 import Budget

DATA = os.urandom(5000) + b"tensor bytes " * 200_000  # 2.6 MB: inflated in several 1 MiB steps


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("encoding", "packed"),
    [
        ("gzip", gzip.compress(DATA)),
        ("deflate", zlib.compress(DATA)),  # the zlib format: what HTTP's and gRPC's "deflate" mean
        ("deflate", _raw_deflate(DATA)),  # a raw deflate stream, as some HTTP clients send
        (" GZIP ", gzip.compress(DATA)),
    ],
)
def test_each_encoding_inflates_and_its_bytes_are_held_against_the_budget(
    encoding: str, packed: bytes
) -> None:
    budget = Budget(1 << 30)
    out = inflate(memoryview(packed), encoding, len(DATA), budget, "rest", "request body")
    assert bytes(out) == DATA
    assert budget.held == len(DATA)  # the caller gives them back once the request is answered


def test_a_body_that_inflates_past_the_limit_is_refused_without_holding_it() -> None:
    bomb = gzip.compress(bytes(50 << 20))  # 50 MiB of zeros in ~50 KB
    budget = Budget(1 << 30)
    with pytest.raises(CompressionError) as e:
        inflate(bomb, "gzip", 4 << 20, budget, "grpc", "request message")
    assert e.value.kind == "too_large"
    assert "request message inflates past the server's limit of 4194304 bytes (--max-payload-mb)" in str(
        e.value
    )
    assert budget.held == 0


def test_the_budget_refusing_the_inflated_bytes_gives_back_what_it_took() -> None:
    budget = Budget(3 << 20)
    budget.take(1 << 20, "rest")  # another request's bytes
    refused: list[str] = []
    budget.on_refuse = refused.append
    with pytest.raises(CompressionError) as e:
        inflate(gzip.compress(bytes(8 << 20)), "gzip", 16 << 20, budget, "rest", "request body")
    assert e.value.kind == "busy" and "--max-inflight-mb" in e.value.message
    assert budget.held == 1 << 20 and refused == ["rest"]


@pytest.mark.parametrize(
    ("encoding", "packed", "kind", "says"),
    [
        ("br", b"whatever", "unsupported", "request body encoded as 'br': send gzip, deflate or identity"),
        ("gzip", gzip.compress(DATA)[:-20], "malformed", "ends before its gzip stream does"),
        ("gzip", gzip.compress(DATA) + b"extra", "malformed", "has bytes after its gzip stream"),
        ("gzip", b"not gzip at all", "malformed", "is not valid gzip data"),
        ("deflate", b"not deflate at all", "malformed", "is not valid deflate data"),
    ],
)
def test_bad_compressed_bodies_are_refused_naming_the_problem(
    encoding: str, packed: bytes, kind: str, says: str
) -> None:
    budget = Budget(1 << 30)
    with pytest.raises(CompressionError) as e:
        inflate(packed, encoding, 16 << 20, budget, "rest", "request body")
    assert e.value.kind == kind and says in e.value.message
    assert budget.held == 0


def test_rest_refusals_map_to_the_statuses_that_name_them() -> None:
    """RestApp's answer to each refusal: 415 another encoding, 413 past --max-payload-mb, 429 (Retry-After,
    as for every 429) when the process's request bytes are spent, 400 a cut stream."""
    from runtime.serving.metrics import Metrics
    from runtime.serving.model import Repository
    from runtime.serving.protocol.http1 import HttpError
    from runtime.serving.protocol.rest import RestApp

    budget = Budget(4 << 20)
    app = RestApp(Repository([]), Metrics(), dict, is_ready=lambda: True, max_payload=2 << 20, budget=budget)
    packed = gzip.compress(bytes(1 << 20))
    assert bytes(app._inflate(memoryview(packed), "gzip")) == bytes(1 << 20)
    budget.give(1 << 20)
    cases = [("zstd", packed, 415), ("gzip", gzip.compress(bytes(3 << 20)), 413), ("gzip", packed[:-9], 400)]
    cases.append(("gzip", packed, 429))  # with 3.5 MiB held by other requests: 1 MiB more does not fit
    for encoding, body, status in cases:
        if status == 429:
            budget.take(3584 << 10, "rest")
        with pytest.raises(HttpError) as e:
            app._inflate(memoryview(body), encoding)
        assert e.value.status == status and e.value.message.startswith(f"Content-Encoding {encoding}: ")
    assert budget.held == 3584 << 10
