"""Compressed requests: REST bodies with `Content-Encoding: gzip|deflate` (tritonclient.http's
`request_compression_algorithm`) and gRPC messages with `grpc-encoding: gzip|deflate` (tritonclient.grpc's
`compression_algorithm`, any grpcio client's `compression=`), inflated before they are decoded.

The inflated bytes are bounded by the server's payload limit (`--max-payload-mb`: a small body that
inflates past it is refused, never held whole) and held against the process's request-bytes budget
(`--max-inflight-mb`) until the request is answered, as received bytes are. Answers go uncompressed:
`Accept-Encoding` and `grpc-accept-encoding` permit compression and never require it, and tritonclient and
grpcio read identity answers whatever they asked for; compressing them would cost the protocol workers' CPU,
which bounds throughput (docs/serving.md)."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.serving.protocol.http1 import Budget

ENCODINGS = ("gzip", "deflate")
ACCEPTED = "identity,deflate,gzip"  # grpc-accept-encoding, in the error that refuses another encoding
_CHUNK = 1 << 20  # inflated bytes per step: the budget is taken as they grow


class CompressionError(Exception):
    """`kind`: unsupported (the encoding), too_large (past the payload limit), busy (the budget refused the
    inflated bytes) or malformed (not a whole stream of that encoding)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def inflate(
    data: memoryview | bytes,
    encoding: str,
    limit: int,
    budget: Budget,
    protocol: str,
    what: str,
) -> bytearray:
    """`data` inflated (`encoding`: gzip, or deflate: the zlib format, as HTTP and gRPC mean it, or a raw
    deflate stream, as some HTTP clients send it), at most `limit` bytes; its length is taken from `budget`
    (the caller gives it back once the request is answered; on CompressionError nothing is held). `what`
    names the thing in messages ("request body", "request message")."""
    encoding = encoding.strip().lower()
    if encoding not in ENCODINGS:
        raise CompressionError(
            "unsupported", f"{what} encoded as {encoding!r}: send gzip, deflate or identity (uncompressed)"
        )
    wbits = zlib.MAX_WBITS | (16 if encoding == "gzip" else 0)
    try:
        return _inflate(data, encoding, limit, budget, protocol, what, wbits)
    except zlib.error as e:
        if encoding == "deflate":  # a raw deflate stream (no zlib header), as some HTTP clients send
            try:
                return _inflate(data, encoding, limit, budget, protocol, what, -zlib.MAX_WBITS)
            except zlib.error:
                pass
        raise CompressionError("malformed", f"{what} is not valid {encoding} data: {e}") from None


def _inflate(
    data: memoryview | bytes, encoding: str, limit: int, budget: Budget, protocol: str, what: str, wbits: int
) -> bytearray:
    d = zlib.decompressobj(wbits)
    out = bytearray()
    pending: bytes | memoryview = data
    try:
        while True:
            chunk = d.decompress(pending, _CHUNK)
            pending = d.unconsumed_tail
            if chunk:
                if len(out) + len(chunk) > limit:
                    raise CompressionError(
                        "too_large",
                        f"{what} inflates past the server's limit of {limit} bytes (--max-payload-mb):"
                        " send a smaller request, or raise the limit",
                    )
                if not budget.take(len(chunk), protocol):
                    raise CompressionError("busy", budget.refusal(len(chunk)))
                out += chunk
            if d.eof or (not chunk and not pending):
                break
        if not d.eof:
            raise CompressionError("malformed", f"{what} ends before its {encoding} stream does")
        if d.unused_data:
            raise CompressionError("malformed", f"{what} has bytes after its {encoding} stream")
    except BaseException:
        budget.give(len(out))
        raise
    return out
