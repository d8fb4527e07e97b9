"""gRPC over HTTP/2 of our own, on asyncio: what GRPCInferenceService needs and no more.

Why: grpc.aio cost a protocol worker 470-650 us of CPU per BERT request on the H200 host and 1.5-2.1 ms per
602 KB ResNet-50 image (3-5x our HTTP/1.1 path), most of it in grpc.aio's Cython callbacks and its poller
thread, not in our code (py-spy); gRPC clients then saw smaller batches and +1.05 to +1.88 ms at batch 1.

What it speaks (RFC 9113 and the gRPC-over-HTTP/2 spec), as a server:
- the connection preface, SETTINGS (ours: 1024 concurrent streams, 16 MiB windows, 1 MiB frames; theirs
  applied, the initial window's change to open streams included), PING answers (see below), WINDOW_UPDATE
  both ways,
  RST_STREAM (the call is cancelled), GOAWAY (theirs: no new calls expected; ours on stop and on errors),
  PRIORITY ignored, padding, header blocks split over CONTINUATION frames;
- HPACK decoding with our own decoder (hpackdec.py: dynamic table; the `hpack` package's Huffman decoding and
  exceptions); our own headers are literals that never touch the peer's dynamic table. A client's calls
  mostly repeat their header block as table indexes only (ghz: 97.6 % of blocks, 8 bytes each): such a block
  changes no state, so its decoding is kept per connection until a block that may change the table (a
  literal, a size update) comes; a client with deadlines sends a new `grpc-timeout` literal each call;
- bidirectional streaming calls (`stream_handlers`: Triton's ModelStreamInfer): each request message
  answered on the call as its handler returns, several at once; OK once the client is done and every answer
  is out;
- unary calls: POST, content-type application/grpc*, one length-prefixed message each way (a request's
  inflated when compressed, grpc-encoding gzip or deflate: protocol.compression; answers uncompressed),
  grpc-timeout (DEADLINE_EXCEEDED), status and percent-encoded message in the trailers, or trailers-only
  for errors;
- flow control on what we send: a response waits for the client's windows and goes in frames no larger than
  the client allows;
- the errors RFC 9113 asks for (h2spec passes every case: tests/integration/serving): frames on streams never
  opened or ended, bad stream ids, windows, priorities and frame sizes end the connection or reset the
  stream; malformed requests reset their stream; frames for a call we reset are dropped; a request that is
  not a gRPC call gets a plain 405 / 415.

A request message is written once, into a buffer of its exact size allocated when its 5-byte length prefix
arrives (a growing buffer cost a fifth of a worker's time per 602 KB image: bytearray's 1/8 over-allocation
copies it ~30 times); `buffers` may place it per method, e.g. ModelInfer's in a protocol worker's
shared-memory slot, so its tensors reach the model process without another copy.

PING answers ride with the next answer while calls are open (at most ACK_DELAY later), first in that write:
grpc-go and grpcio clients send a PING whenever a response reaches them (their bandwidth-delay probe), so
answering at once cost a protocol worker one more socket write per call, and its client one more read.
Without open calls they go at once (keepalives).

Not here: TLS (the pod's mesh or an ingress terminates it), client- or server-only streaming, server push,
compressed answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from hpack.exceptions import HPACKError

from runtime.serving.protocol.compression import ACCEPTED, CompressionError, inflate
from runtime.serving.protocol.hpackdec import Decoder
from runtime.serving.protocol.http1 import READ_CHUNK, Body, Budget, Listener, PlainBody, close_then_drop

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# HTTP/2 error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11
# gRPC status codes
OK, CANCELLED, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 1, 3, 4, 8
UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 12, 13, 14

MAX_FRAME = 1 << 20  # the largest frame we accept (SETTINGS_MAX_FRAME_SIZE)
MAX_DECODED = 64  # index-only header blocks remembered per connection
WINDOW = 1 << 24  # our receive window, per stream and for the connection
LEND_MIN = 4096  # bytes of a DATA frame still to come from which the read goes straight into its message
MAX_STREAMS = 1024
MAX_WINDOW = 0x7FFFFFFF
CLOSED_KEPT = 256  # streams remembered once closed (how each ended: a late frame on one is told apart)
# request header fields that are HTTP/1.1's connection management: malformed in HTTP/2 (RFC 9113 8.2.2)
CONNECTION_FIELDS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
REQUEST_PSEUDO = frozenset({":method", ":scheme", ":path", ":authority"})
MAX_HEADER_LIST = 16 << 10
DEFAULT_WINDOW = 65535
ACK_DELAY = 0.005  # s: the longest a PING answer waits for an answer to ride with
MAX_HELD_ACKS = 64  # PING answers held for a ride at most; more go with this read's write
MAX_PAUSED_ACKS = 1000  # PING and SETTINGS answers owed while the client reads none of ours: a flood
# calls a client may cancel (RST_STREAM) in a burst, and per second after it (nghttp2's defaults): past them a
# "rapid reset" (CVE-2023-44487), calls started and cancelled at once, each costing us work but no wait
RESET_BURST, RESET_RATE = 1000, 33.0

_FRAME = struct.Struct(">HBBBI")  # a 24-bit length as 16 + 8 bits, type, flags, stream id


def frame(kind: int, flags: int, sid: int, payload: bytes | memoryview = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, kind, flags, sid) + payload


# what the server sends first on each connection: our SETTINGS, and the connection window raised to WINDOW
SERVER_PREFACE = frame(
    SETTINGS,
    0,
    0,
    struct.pack(
        ">HIHIHIHI",
        3,  # MAX_CONCURRENT_STREAMS
        MAX_STREAMS,
        4,  # INITIAL_WINDOW_SIZE
        WINDOW,
        5,  # MAX_FRAME_SIZE
        MAX_FRAME,
        6,  # MAX_HEADER_LIST_SIZE
        MAX_HEADER_LIST,
    ),
) + frame(WINDOW_UPDATE, 0, 0, (WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman coding."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def percent_encode(message: str) -> bytes:
    """grpc-message: printable ASCII except '%' as it is, everything else as %XX of its UTF-8 bytes."""
    return b"".join(
        bytes((c,)) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in message.encode()
    )


NOT_GRPC = b"this port speaks gRPC: HTTP/2 POST with content-type application/grpc (REST: the HTTP port)\n"
STATUS_200 = b"\x88"  # indexed: static table entry 8, ":status: 200"
RESPONSE_HEADERS = STATUS_200 + literal(b"content-type", b"application/grpc")
OK_TRAILERS = literal(b"grpc-status", b"0")
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

Handler = Callable[[memoryview], Awaitable[bytes]]
# (a request message's size, its 5-byte prefix included; its bytes received so far) -> its buffer, or None
Buffer = Callable[[int, memoryview], Body | None]


class RpcError(Exception):
    """Ends a call with a gRPC status (not OK), a message, and trailers of its own."""

    def __init__(self, code: int, message: str, trailers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


# overload (the process's request bytes, a full queue): clients with a retry policy wait this long before
# they try again (gRPC's retry design, A6), instead of adding to the overload at once
PUSHBACK = (("grpc-retry-pushback-ms", "1000"),)


def parse_timeout(value: str | None) -> float | None:
    """grpc-timeout: up to 8 digits and a unit (H M S m u n) -> seconds; None when absent or malformed."""
    if not value or len(value) < 2 or value[-1] not in _UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * _UNITS[value[-1]]


# how a refused compressed message ends its call (protocol.compression's kinds)
_INFLATE_FAILED = {
    "unsupported": (UNIMPLEMENTED, (("grpc-accept-encoding", ACCEPTED),)),
    "too_large": (RESOURCE_EXHAUSTED, ()),
    "busy": (RESOURCE_EXHAUSTED, PUSHBACK),
}


def malformed(fields: Sequence[tuple[str, str]], trailers: bool) -> str:
    """Why a request's header block (or its trailers) is malformed (RFC 9113 8.2, 8.3), or ""."""
    seen: set[str] = set()
    regular = False
    for name, value in fields:
        if name != name.lower():
            return f"header field name {name!r} is not lowercase"
        if name.startswith(":"):
            if trailers or regular:
                return f"pseudo-header {name} {'in trailers' if trailers else 'after a regular field'}"
            if name not in REQUEST_PSEUDO or name in seen:
                return f"pseudo-header {name} {'repeated' if name in seen else 'is not a request one'}"
            seen.add(name)
        else:
            regular = True
            if name in CONNECTION_FIELDS or (name == "te" and value != "trailers"):
                return f"connection-specific header field {name}"
    if not trailers:
        missing = [p for p in (":method", ":scheme", ":path") if p not in seen]
        if missing:
            return f"no {', '.join(missing)}"
        if not dict(fields)[":path"]:
            return "empty :path"
    return ""


class _Stream:
    __slots__ = (
        *("body", "expired", "filled", "head", "headers", "out", "send_window", "sid", "task", "trailers"),
        *("unacked", "inbox", "ended_in", "started", "expect", "received", "plain", "counted"),
    )

    def __init__(self, sid: int, headers: dict[str, str], send_window: int) -> None:
        self.sid = sid
        self.headers = headers
        self.head = bytearray()  # the first bytes, while fewer than the 5 of the length prefix
        self.body: Body | None = None  # the length-prefixed message, once its length is known (its size
        # counts against the connection's bound until released)
        self.filled = 0  # bytes of it received
        self.unacked = 0  # bytes received since our last WINDOW_UPDATE for the stream
        self.send_window = send_window
        self.out: memoryview | None = None  # response DATA not sent yet (waiting for a window)
        self.trailers = b""
        self.task: asyncio.Task[None] | None = None
        self.expired = False
        # a streaming call's: its whole messages for its task (None: the client sent its last), whether the
        # client ended its side, whether our response headers went out
        self.inbox: asyncio.Queue[Body | None] | None = None
        self.ended_in = False
        self.started = False
        self.expect = -1  # the request's content-length, when it gives one
        self.received = 0  # DATA payload bytes received
        self.plain = False  # not a gRPC call: answered in plain HTTP (405 or 415, and why)
        self.counted = False  # its DATA is counted (a content-length to check, or plain)

    def receiving(self) -> bool:
        """Whether the client may still send on it: a unary call until it is dispatched, a streaming one
        until the client ends its side."""
        return self.task is None if self.inbox is None else not self.ended_in


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # a frame (or the preface) begun in an earlier read
        self.view = memoryview(b"")  # what the frame handlers read: this read's bytes, or buf's
        self.data_left = 0  # bytes still to come of the DATA frame being streamed to its message
        self.data_sid = 0
        self.data_flags = 0
        self.lent: _Stream | None = None  # the call whose message the read under way lands in (get_buffer)
        self.preface = False
        self.decoder = Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.decoded: dict[bytes, dict[str, str]] = {}  # index-only header blocks, valid for this table
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0
        # the last CLOSED_KEPT streams closed, each with whether we reset it (frames the client sent before
        # it heard are dropped) or it ended (more frames on it are the client's error)
        self.closed: dict[int, bool] = {}
        self.peer_frame = 16384
        self.peer_window = DEFAULT_WINDOW  # the initial send window of each new stream
        self.conn_window = DEFAULT_WINDOW  # what we may still send on the connection
        self.recv_unacked = 0
        self.block_sid = 0  # a header block continued in CONTINUATION frames
        self.block_flags = 0
        self.block = bytearray()
        self.bad_block = 0  # a stream refused at its HEADERS frame, whose header block is still to decode
        self.goaway_sent = False
        self.blocked: dict[int, _Stream] = {}  # responses waiting for a window, in order
        self.out: list[bytes] = []  # frames to write at the end of this turn
        self.acks: list[bytes] = []  # PING answers that go first in the next write
        self.ack_timer: asyncio.TimerHandle | None = None
        self.write_paused = False  # the transport holds more than its high-water mark: the client lags
        self.paused_acks = 0  # PING and SETTINGS answers owed since then
        self.buffered = 0  # request bytes held for the calls open on this connection
        self.last_active = time.monotonic()  # the last read (GrpcServer's sweep closes quiet connections)
        self.resets = float(RESET_BURST)  # tokens for cancelled calls, refilled at RESET_RATE per second
        self.resets_at = self.last_active

    # -- asyncio --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport instances
        self.server.connections.add(self)
        self.transport.write(SERVER_PREFACE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        self.transport = None
        if self.ack_timer is not None:
            self.ack_timer.cancel()
        for s in self.streams.values():
            if s.task is not None:
                s.task.cancel()
            else:
                self._release(s)
        self.streams.clear()
        self.blocked.clear()
        self.buffered = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next read lands: the read buffer, or, for the rest of a unary call's DATA frame under
        way (LEND_MIN or more), the call's message itself, so that its bytes are copied once (by the
        kernel), as a REST body's are. Of a 602 KB image sent in frames as large as we allow (grpcio's C
        core: tritonclient, perf_analyzer; bench/grpcload -h2 xnet) 40-57 % go that way (the read that finds
        a frame's start takes up to READ_CHUNK of it); grpc-go's 16 KiB frames mostly arrive whole (1-2 %):
        hack/grpc-lend.py."""
        self.lent = None
        if self.data_left >= LEND_MIN and not self.buf:
            s = self.streams.get(self.data_sid)
            body = None if s is None or s.task or s.inbox or s.plain else s.body
            if s is not None and body is not None and s.filled + self.data_left <= len(body.view):
                self.lent = s
                return body.view[s.filled : s.filled + self.data_left]
        return self.server.scratch

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused, self.paused_acks = False, 0

    def buffer_updated(self, nbytes: int) -> None:
        self.last_active = time.monotonic()
        lent, self.lent = self.lent, None
        data = self.server.scratch[:nbytes]
        if self.data_left:  # the rest of a DATA frame: straight to its message
            n = min(self.data_left, nbytes)  # all of this read if it was lent (get_buffer's bound)
            self.data_left -= n
            if lent is None:
                self._data_bytes(self.data_sid, data[:n])
            else:  # the read landed in the message itself: only counted
                lent.filled += n
                if lent.counted:
                    lent.received += n
                    self._overran(lent)
            if not self.data_left:
                self._data_end(self.data_flags, self.data_sid)
            data = data[n:]
        if self.buf or not self.preface:
            self.buf += data
            if not self.preface and not self._preface():
                return
            with memoryview(self.buf) as view:
                off = self._frames(view)
                rest = bytearray(view[off:])
            self.buf = rest
        elif len(data):
            off = self._frames(data)
            self.buf = bytearray(data[off:])  # an unfinished frame header or non-DATA frame (small)
        self.view = memoryview(b"")
        self._write(acks_wait=True)

    def _preface(self) -> bool:
        if len(self.buf) < len(PREFACE):
            if not PREFACE.startswith(self.buf):
                self._fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface (this port speaks gRPC)")
            return False
        if self.buf[: len(PREFACE)] != PREFACE:
            self._fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface (this port speaks gRPC)")
            return False
        del self.buf[: len(PREFACE)]
        self.preface = True
        return True

    def _frames(self, view: memoryview) -> int:
        """Handle the whole frames in `view`, and the part of an unpadded DATA frame that is there (its
        payload goes to its message as it arrives); returns how many bytes were consumed."""
        self.view = view
        off, end = 0, len(view)
        while end - off >= 9 and self.transport is not None:
            hi, lo, kind, flags, sid = _FRAME.unpack_from(view, off)
            length, sid = hi << 8 | lo, sid & 0x7FFFFFFF
            if length > MAX_FRAME:
                self._fail(FRAME_SIZE_ERROR, f"frame of {length} bytes, more than the {MAX_FRAME} we allow")
                return end
            have = end - off - 9
            if have < length:
                if kind != DATA or flags & PADDED or self.block_sid:
                    break  # wait for the whole frame
                self._data_start(sid, length)
                self._data_bytes(sid, view[off + 9 : end])
                self.data_left, self.data_sid, self.data_flags = length - have, sid, flags
                return end
            if kind == DATA and not flags & (PADDED | END_STREAM):
                s = self.streams.get(sid)
                # the middle of a unary call's message (grpc-go sends 16 KiB frames): straight into its
                # buffer, what _data_start, _receive and _data_end do for it in one place
                if s is not None and s.body is not None and s.task is None and s.inbox is None:
                    filled = s.filled + length
                    if filled <= len(s.body.view) and not s.counted and not self.block_sid:
                        s.body.view[s.filled : filled] = view[off + 9 : off + 9 + length]
                        s.filled = filled
                        s.unacked += length
                        self.recv_unacked += length
                        if self.recv_unacked >= WINDOW // 2 or s.unacked >= WINDOW // 2:
                            self._window_updates(s)
                        off += 9 + length
                        continue
            self._frame(kind, flags, sid, off + 9, off + 9 + length)
            off += 9 + length
        return off if self.transport is not None else end

    def _window_updates(self, s: _Stream | None) -> None:
        """WINDOW_UPDATEs for the connection and `s` (if given), each once half of its window is used."""
        if self.recv_unacked >= WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, self.recv_unacked.to_bytes(4, "big")))
            self.recv_unacked = 0
        if s is not None and s.unacked >= WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, s.sid, s.unacked.to_bytes(4, "big")))
            s.unacked = 0

    # -- frames in --
    def _frame(self, kind: int, flags: int, sid: int, a: int, b: int) -> None:
        buf = self.view
        if self.block_sid and kind != CONTINUATION:
            self._fail(PROTOCOL_ERROR, "a header block was interrupted by another frame")
        elif kind == DATA:
            self._data(flags, sid, a, b)
        elif kind == HEADERS:
            if sid == 0 or sid % 2 == 0:
                return self._fail(PROTOCOL_ERROR, f"HEADERS on stream {sid}: clients open odd-numbered ones")
            pad = buf[a] if flags & PADDED else 0
            a += 1 if flags & PADDED else 0
            if flags & PRIORITY_FLAG:
                if b - a >= 4 and int.from_bytes(buf[a : a + 4], "big") & MAX_WINDOW == sid:
                    # refused; its header block is still decoded (HPACK's state), then dropped
                    self._stream_error(sid, PROTOCOL_ERROR, "a stream that depends on itself")
                    self.bad_block = sid
                a += 5
            if a > b - pad:
                return self._fail(PROTOCOL_ERROR, "HEADERS padding longer than the frame")
            if flags & END_HEADERS:
                self._headers(sid, flags, bytes(buf[a : b - pad]))
            else:
                self.block_sid, self.block_flags, self.block = sid, flags, bytearray(buf[a : b - pad])
        elif kind == CONTINUATION:
            if sid != self.block_sid:
                return self._fail(PROTOCOL_ERROR, "CONTINUATION without the HEADERS it continues")
            self.block += buf[a:b]
            if len(self.block) > 4 * MAX_HEADER_LIST:
                return self._fail(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                block, self.block_sid, self.block = bytes(self.block), 0, bytearray()
                self._headers(sid, self.block_flags, block)
        elif kind == SETTINGS:
            if sid or (flags & ACK and b > a) or (b - a) % 6:
                return self._fail(FRAME_SIZE_ERROR if (b - a) % 6 else PROTOCOL_ERROR, "malformed SETTINGS")
            if not flags & ACK:
                self._settings(a, b)
                if self.transport is not None and self._owe_answer():
                    self.out.append(frame(SETTINGS, ACK, 0))
                self._unblock()  # after the ACK: data sent by the new windows follows it
        elif kind == PING:
            if b - a != 8 or sid:
                return self._fail(FRAME_SIZE_ERROR, "malformed PING")
            if not flags & ACK and self._owe_answer():
                self.acks.append(frame(PING, ACK, 0, bytes(buf[a:b])))
                if len(self.acks) >= MAX_HELD_ACKS:
                    self.out += self.acks
                    self.acks = []
        elif kind == WINDOW_UPDATE:
            if b - a != 4:
                return self._fail(FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
            inc = int.from_bytes(buf[a:b], "big") & MAX_WINDOW
            if sid == 0:
                if not inc:
                    return self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 bytes")
                self.conn_window += inc
                if self.conn_window > MAX_WINDOW:
                    return self._fail(FLOW_CONTROL_ERROR, "connection window beyond 2^31-1 bytes")
            elif sid > self.last_sid:
                return self._fail(PROTOCOL_ERROR, f"WINDOW_UPDATE on stream {sid}, not opened yet")
            elif (s := self.streams.get(sid)) is not None:
                s.send_window += inc
                if not inc or s.send_window > MAX_WINDOW:
                    why = "of 0 bytes" if not inc else "past 2^31-1 bytes"
                    return self._stream_error(
                        sid, FLOW_CONTROL_ERROR if inc else PROTOCOL_ERROR, f"WINDOW_UPDATE {why}"
                    )
            self._unblock()
        elif kind == RST_STREAM:
            if b - a != 4:
                return self._fail(FRAME_SIZE_ERROR, "malformed RST_STREAM")
            if sid == 0 or sid > self.last_sid:
                return self._fail(PROTOCOL_ERROR, f"RST_STREAM on stream {sid}, not an opened one")
            s = self._drop(sid)
            self.blocked.pop(sid, None)
            if s is not None:
                if s.task is not None:
                    s.task.cancel()
                self._count_reset()
        elif kind == PUSH_PROMISE:
            self._fail(PROTOCOL_ERROR, "clients may not push")
        elif kind == PRIORITY:  # otherwise ignored
            if sid == 0:
                return self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if b - a != 5:
                return self._stream_error(sid, FRAME_SIZE_ERROR, "PRIORITY of other than 5 bytes")
            if int.from_bytes(buf[a : a + 4], "big") & MAX_WINDOW == sid:
                return self._stream_error(sid, PROTOCOL_ERROR, "a stream that depends on itself")
        elif kind == GOAWAY and sid:  # otherwise: the client starts no new calls; ours finish
            self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
        # unknown types: nothing to do

    def _count_reset(self) -> None:
        """A call the client cancelled: past RESET_BURST, and RESET_RATE per second, end the connection."""
        now = time.monotonic()
        self.resets = min(float(RESET_BURST), self.resets + (now - self.resets_at) * RESET_RATE) - 1
        self.resets_at = now
        if self.resets < 0:
            self._fail(
                ENHANCE_YOUR_CALM,
                f"more than {RESET_BURST} calls cancelled at once, or {RESET_RATE:g} per second after that",
            )

    def _owe_answer(self) -> bool:
        """Count an answer owed to a PING or SETTINGS frame; past MAX_PAUSED_ACKS of them while the client
        reads none of what we write, end the connection (a PING or SETTINGS flood: each answer would stay
        buffered here, and memory would grow with what the client sends)."""
        if self.write_paused:
            self.paused_acks += 1
            if self.paused_acks > MAX_PAUSED_ACKS:
                transport = self.transport
                self._fail(
                    ENHANCE_YOUR_CALM,
                    f"more than {MAX_PAUSED_ACKS} PING or SETTINGS frames to answer while the client "
                    "reads none of our frames",
                )
                if transport is not None:
                    transport.abort()  # a flood: what is still to go out is dropped at once
                return False
        return True

    def _settings(self, a: int, b: int) -> None:
        for off in range(a, b, 6):
            key, value = struct.unpack_from(">HI", self.view, off)
            if key == 4:  # INITIAL_WINDOW_SIZE: applies to the open streams too
                if value > 0x7FFFFFFF:
                    return self._fail(FLOW_CONTROL_ERROR, "initial window beyond 2^31-1")
                for s in self.streams.values():
                    s.send_window += value - self.peer_window
                self.peer_window = value
            elif key == 2 and value > 1:  # ENABLE_PUSH (we never push)
                return self._fail(PROTOCOL_ERROR, "ENABLE_PUSH other than 0 or 1")
            elif key == 5:  # MAX_FRAME_SIZE
                if not 16384 <= value <= 16777215:
                    return self._fail(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_frame = value

    def _decode(self, block: bytes, trailers: bool = False) -> dict[str, str] | str:
        """A header block's fields (HPACKError), or why they make a malformed request (RFC 9113 8.2, 8.3; a
        stream error). A block of one-byte indexed fields only (every byte has its high bit set: a longer
        index would end in a byte without it) reads the dynamic table without changing it, so its result
        holds until another block changes the table; any other block may."""
        if block and min(block) >= 0x80 and not trailers:
            headers = self.decoded.get(block)
            if headers is None:
                fields = self.decoder.decode(block)
                why = malformed(fields, trailers)  # type: ignore[arg-type]
                if why:
                    return why
                if len(self.decoded) >= MAX_DECODED:
                    self.decoded.clear()
                headers = self.decoded[block] = dict(fields)  # type: ignore[arg-type]
            return headers
        self.decoded.clear()
        fields = self.decoder.decode(block)
        return malformed(fields, trailers) or dict(fields)  # type: ignore[arg-type]

    def _headers(self, sid: int, flags: int, block: bytes) -> None:
        s = self.streams.get(sid)
        try:
            headers = self._decode(block, trailers=s is not None)
        except HPACKError as e:
            return self._fail(COMPRESSION_ERROR, f"header block: {e}")
        if self.bad_block == sid:  # refused already (its block decoded only to keep HPACK's state)
            self.bad_block, self.last_sid = 0, max(self.last_sid, sid)
            return
        if s is not None:  # trailers from the client: the request is complete
            if not s.receiving():
                return self._stream_error(sid, STREAM_CLOSED, "HEADERS after the end of the request")
            if isinstance(headers, str) or not flags & END_STREAM:
                why = headers if isinstance(headers, str) else "trailers without END_STREAM"
                return self._stream_error(sid, PROTOCOL_ERROR, f"malformed request: {why}")
            self._ended_in(s)
            return
        if sid <= self.last_sid:
            if self.closed.get(sid):
                return  # a stream we reset: the client sent this before it heard
            if sid in self.closed:
                return self._fail(STREAM_CLOSED, f"HEADERS on stream {sid}, which has ended")
            return self._fail(PROTOCOL_ERROR, f"stream {sid} opened after stream {self.last_sid}")
        self.last_sid = sid
        if isinstance(headers, str):
            return self._stream_error(sid, PROTOCOL_ERROR, f"malformed request: {headers}")
        if self.goaway_sent or self.server.stopping or len(self.streams) >= MAX_STREAMS:
            self.out.append(frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            self._closed(sid, True)
            return
        s = _Stream(sid, headers, self.peer_window)  # headers: shared with later calls, read only
        if "content-length" in headers:
            if not headers["content-length"].isdigit():
                return self._stream_error(sid, PROTOCOL_ERROR, "malformed request: content-length")
            s.expect = int(headers["content-length"])
        self.streams[sid] = s
        # not a gRPC call: its body is counted, not kept, and it gets a plain HTTP answer (_not_grpc)
        s.plain = headers[":method"] != "POST" or not headers.get("content-type", "").startswith(
            "application/grpc"
        )
        s.counted = s.plain or s.expect >= 0
        # a streaming call: its task answers message by message
        if not s.plain and headers[":path"] in self.server.stream_handlers:
            s.inbox = asyncio.Queue()
            s.task = asyncio.get_running_loop().create_task(self._stream_call(s))
            s.task.add_done_callback(functools.partial(self._stream_done, s))
        if flags & END_STREAM:
            self._ended_in(s)

    def _data(self, flags: int, sid: int, a: int, b: int) -> None:
        """A whole DATA frame, its payload at view[a:b]."""
        self._data_start(sid, b - a)
        pad = self.view[a] if flags & PADDED else 0
        a += 1 if flags & PADDED else 0
        if a > b - pad:
            return self._fail(PROTOCOL_ERROR, "DATA padding longer than the frame")
        self._data_bytes(sid, self.view[a : b - pad])
        self._data_end(flags, sid)

    def _data_start(self, sid: int, length: int) -> None:
        """Flow control counts a DATA frame's whole payload, padding included, open stream or not."""
        self.recv_unacked += length
        if self.recv_unacked >= WINDOW // 2:
            self._window_updates(None)
        s = self.streams.get(sid)
        if s is not None and s.receiving():
            s.unacked += length
        else:
            self._stray_data(sid, s)

    def _stray_data(self, sid: int, s: _Stream | None) -> None:
        """A DATA frame on no stream receiving: the client's error, unless it is for a stream we reset (it
        was sent before the client heard)."""
        if sid == 0 or sid > self.last_sid:
            self._fail(PROTOCOL_ERROR, f"DATA on stream {sid}, not an opened one")
        elif s is not None or self.closed.get(sid) is False:
            self._stream_error(sid, STREAM_CLOSED, "DATA after the end of the request")

    def _data_bytes(self, sid: int, data: memoryview) -> None:
        s = self.streams.get(sid)
        if s is not None and s.receiving():  # else reset, refused or complete: its bytes are dropped
            if s.counted:
                self._count(s, data)
            else:
                self._receive(s, data)

    def _count(self, s: _Stream, data: memoryview) -> None:
        """DATA of a request with a content-length (checked against it), or not a gRPC call (not kept)."""
        s.received += len(data)
        if not self._overran(s) and not s.plain:
            self._receive(s, data)

    def _overran(self, s: _Stream) -> bool:
        """Whether `s` received more DATA than its content-length said (the stream is then reset)."""
        if s.received > s.expect >= 0:
            why = f"content-length {s.expect}, more DATA than that"
            self._stream_error(s.sid, PROTOCOL_ERROR, f"malformed request: {why}")
            return True
        return False

    def _data_end(self, flags: int, sid: int) -> None:
        s = self.streams.get(sid)
        if s is None or not s.receiving() or self.transport is None:
            return
        if flags & END_STREAM:
            if s.expect >= 0 and s.expect != s.received:
                why = f"content-length {s.expect}, DATA of {s.received} bytes"
                return self._stream_error(sid, PROTOCOL_ERROR, f"malformed request: {why}")
            self._ended_in(s)
        elif s.unacked >= WINDOW // 2:
            self._window_updates(s)

    def _receive(self, s: _Stream, data: memoryview) -> None:
        """Copy a DATA payload into the stream's message buffer, allocating it (exact size) once the length
        prefix is in; or end the stream (too large, too many bytes held, more than one message). A streaming
        call's whole messages go to its task as they complete, several per frame if the frame holds them."""
        while True:
            if s.body is None:
                if s.head or len(data) < 5:
                    s.head += data
                    if len(s.head) < 5:
                        return
                    data, s.head = memoryview(s.head), bytearray()
                size = 5 + int.from_bytes(data[1:5], "big")
                if size - 5 > self.server.max_message:
                    self._end(
                        s,
                        RESOURCE_EXHAUSTED,
                        f"request message larger than the server's limit of {self.server.max_message} bytes",
                        reset=True,
                    )
                    return
                if self.buffered + size > self.server.max_buffered:
                    self._end(
                        s,
                        RESOURCE_EXHAUSTED,
                        f"more than {self.server.max_buffered} bytes of requests in flight on this "
                        "connection: wait for answers or spread the calls over more connections",
                        reset=True,
                    )
                    return
                if not self.server.budget.take(size, "grpc"):
                    self._end(
                        s, RESOURCE_EXHAUSTED, self.server.budget.refusal(size), reset=True, trailers=PUSHBACK
                    )
                    return
                make = self.server.buffers.get(s.headers.get(":path", ""))
                body = make(size, data) if make is not None else None
                s.body = body or PlainBody(memoryview(bytearray(size)))
                self.buffered += size
            view, n = s.body.view, len(data)
            room = len(view) - s.filled
            if n > room and s.inbox is None:
                self._end(s, INTERNAL, "a unary call carries exactly one length-prefixed message", reset=True)
                return
            view[s.filled : s.filled + min(n, room)] = data[:room]
            s.filled += min(n, room)
            if s.inbox is None or s.filled < len(view):
                return
            s.inbox.put_nowait(s.body)  # a whole message of a streaming call: its task answers it
            s.body, s.filled = None, 0
            if n <= room:
                return
            data = data[room:]  # the next message starts in this frame

    # -- calls --
    def _ended_in(self, s: _Stream) -> None:
        """The client sent the last of its request: a unary call runs now; a streaming one's task answers
        what is queued, then ends the call (a message cut short ends it with an error)."""
        if s.inbox is None:
            s.task = asyncio.get_running_loop().create_task(self._call(s))
            # its buffer back once it is done, even cancelled before it ran (a reset: no finally runs then)
            s.task.add_done_callback(functools.partial(self._call_done, s))
            return
        s.ended_in = True
        if s.body is not None or s.head:
            self._end(s, INTERNAL, "the client ended its stream in the middle of a message")
            self._stop_stream(s)
        else:
            s.inbox.put_nowait(None)

    async def _stream_call(self, s: _Stream) -> None:
        """A streaming call (bidirectional: `GrpcServer.stream_handlers`): each request message is answered
        by one response message as soon as its handler returns, several at once; once the client ends its
        side and every answer is out, OK. grpc-timeout bounds the whole call."""
        running: set[asyncio.Task[None]] = set()
        try:
            await self._guarded(s, functools.partial(self._stream_messages, s, running))
        finally:
            for one in list(running):
                one.cancel()

    async def _stream_messages(self, s: _Stream, running: set[asyncio.Task[None]]) -> None:
        handler = self.server.stream_handlers[s.headers[":path"]]
        assert s.inbox is not None
        while (body := await s.inbox.get()) is not None:
            one = asyncio.get_running_loop().create_task(self._stream_one(s, handler, body))
            running.add(one)
            # its bytes back once it is done, even cancelled before it ran (no finally runs then)
            one.add_done_callback(functools.partial(self._message_done, running, body))
        if running:
            await asyncio.gather(*running)
        self._stream_close(s)

    def _message_done(self, running: set[asyncio.Task[None]], body: Body, task: asyncio.Task[None]) -> None:
        running.discard(task)
        self._give(body)

    def _call_done(self, s: _Stream, _: object) -> None:
        self._release(s)

    def _stream_done(self, s: _Stream, _: object = None) -> None:
        """A streaming call's task is done (or was cancelled before it ran): the bytes of the messages it
        did not take, and of one still arriving, go back."""
        assert s.inbox is not None
        while not s.inbox.empty():
            if (body := s.inbox.get_nowait()) is not None:
                self._give(body)
        self._release(s)

    async def _stream_one(self, s: _Stream, handler: Handler, body: Body) -> None:
        held = 0  # request bytes held for an inflated message
        try:  # (its bytes go back when this task is done: _message_done)
            request, held = self._message(s, body.view)
            reply = await handler(request)
        except Exception as e:  # it ends the whole call (answers to other messages are dropped)
            self._failed(s, e)
            self._stop_stream(s)
            return
        finally:
            self.server.budget.give(held)
        if self.transport is None or self.streams.get(s.sid) is not s:
            return  # reset by the client meanwhile, or the connection is gone
        if not s.started:
            s.started = True
            self.out.append(frame(HEADERS, END_HEADERS, s.sid, RESPONSE_HEADERS))
        message = b"\x00" + len(reply).to_bytes(4, "big") + reply
        s.out = memoryview(message if s.out is None else bytes(s.out) + message)
        self._send(s)
        self._write()

    def _stop_stream(self, s: _Stream) -> None:
        if s.task is not None and s.task is not asyncio.current_task():
            s.task.cancel()

    def _stream_close(self, s: _Stream) -> None:
        """Every answer of a streaming call is queued: OK once they are out (trailers-only without any)."""
        if self.transport is None or self.streams.get(s.sid) is not s:
            return
        if not s.started:
            self._end(s, 0, "")
            return
        s.trailers = OK_TRAILERS
        if s.out is None:
            s.out = memoryview(b"")
        self._send(s)
        self._write()

    async def _call(self, s: _Stream) -> None:
        """A unary call, once its request is whole (its buffer goes back when the task is done: _ended_in)."""
        await self._guarded(s, functools.partial(self._unary, s))

    async def _unary(self, s: _Stream) -> None:
        h = s.headers
        handler = self.server.handlers.get(h.get(":path", ""))
        if handler is None:
            raise RpcError(UNIMPLEMENTED, f"unknown method {h.get(':path')!r}")
        if s.body is None or s.filled != len(s.body.view):  # no prefix, or fewer bytes than it said
            raise RpcError(INTERNAL, "a unary call carries exactly one length-prefixed message")
        message, held = self._message(s, s.body.view)
        try:
            self._answer(s, await handler(message))
        finally:
            self.server.budget.give(held)

    def _message(self, s: _Stream, data: memoryview) -> tuple[memoryview, int]:
        """A request message without its length prefix, inflated when its compressed flag is set
        (protocol.compression), and the request bytes held for it, which the caller gives back once it is
        answered."""
        if not data[0]:
            return data[5:], 0
        encoding = s.headers.get("grpc-encoding", "identity")
        if encoding.strip().lower() == "identity":
            raise RpcError(
                INTERNAL,
                "a message flagged compressed while grpc-encoding is identity: clear its flag, or name"
                " its encoding (gzip, deflate)",
            )
        try:
            out = inflate(
                data[5:], encoding, self.server.max_message, self.server.budget, "grpc", "request message"
            )
        except CompressionError as e:
            code, trailers = _INFLATE_FAILED.get(e.kind, (INTERNAL, ()))
            raise RpcError(code, e.message, trailers=trailers) from None
        return memoryview(out), len(out)

    async def _guarded(self, s: _Stream, work: Callable[[], Awaitable[None]]) -> None:
        """Run a call's `work` (in the call's task): a status for what it raises, DEADLINE_EXCEEDED once its
        grpc-timeout passes."""
        h = s.headers
        timer = None
        try:
            if s.plain:
                return self._not_grpc(s)
            timeout = parse_timeout(h.get("grpc-timeout"))
            if timeout is not None:
                timer = asyncio.get_running_loop().call_later(timeout, self._expire, s)
                _DEADLINE.set(time.monotonic() + timeout)  # this call's task (and those it starts) only
            await work()
        except asyncio.CancelledError:
            if not s.expired:
                raise  # the client reset the stream or left
            self._end(s, DEADLINE_EXCEEDED, "deadline exceeded (grpc-timeout)")
        except Exception as e:
            self._failed(s, e)
        finally:
            if timer is not None:
                timer.cancel()
            self.last_active = time.monotonic()  # quiet from its answer on, as HTTP/1.1 counts (not before)

    def _not_grpc(self, s: _Stream) -> None:
        """A plain HTTP answer to a request that is not a gRPC call (a browser, curl, a health checker): 405
        or 415 and why, as grpc-go answers."""
        if self.transport is None or self.streams.get(s.sid) is not s:
            return
        method = s.headers.get(":method", "")
        status = b"405" if method != "POST" else b"415"
        head = b"\x08" + _hpack_int(len(status), 7) + status + literal(b"content-type", b"text/plain")
        if method == "HEAD":
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, s.sid, head))
            self._drop(s.sid, s.receiving())
        else:
            self.out.append(frame(HEADERS, END_HEADERS, s.sid, head))
            s.out = memoryview(NOT_GRPC)
            self._send(s)  # as the client's windows allow; the last DATA frame ends the stream
        self._write()

    def _failed(self, s: _Stream, e: Exception) -> None:
        """End a call with what its handler raised: an RpcError's status, else INTERNAL (logged; call this
        from the except clause, which the log's traceback comes from)."""
        if isinstance(e, RpcError):
            self._end(s, e.code, e.message, trailers=e.trailers)
            return
        log.exception("gRPC call failed", extra={"path": s.headers.get(":path")})
        self._end(s, INTERNAL, f"{type(e).__name__}: {e}")

    def _expire(self, s: _Stream) -> None:
        if s.task is not None and not s.task.done():
            s.expired = True
            s.task.cancel()

    def _answer(self, s: _Stream, reply: bytes) -> None:
        if self.transport is None or self.streams.get(s.sid) is not s:
            return  # reset by the client meanwhile, or the connection is gone
        self.out.append(frame(HEADERS, END_HEADERS, s.sid, RESPONSE_HEADERS))
        s.out = memoryview(b"\x00" + len(reply).to_bytes(4, "big") + reply)
        s.trailers = OK_TRAILERS
        self._send(s)
        self._write()

    def _end(
        self,
        s: _Stream,
        code: int,
        message: str,
        reset: bool = False,
        trailers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Trailers-only answer with a status; `reset` also tells the client to stop sending (so does an
        answer before the client's last message, as gRPC servers do)."""
        reset = reset or s.receiving()
        if self.transport is None or self._drop(s.sid, reset) is None:
            return
        block = RESPONSE_HEADERS + literal(b"grpc-status", str(code).encode())
        block += literal(b"grpc-message", percent_encode(message))
        for name, value in trailers:
            block += literal(name.encode(), value.encode())
        self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, s.sid, block))
        if reset:
            self.out.append(frame(RST_STREAM, 0, s.sid, NO_ERROR.to_bytes(4, "big")))
        self._write()

    def _send(self, s: _Stream) -> None:
        """Queue as much of the response as the windows allow; the trailers once all of it is out."""
        out = s.out
        assert out is not None
        while len(out):
            n = min(len(out), self.peer_frame, self.conn_window, s.send_window)
            if n <= 0:
                s.out = out
                self.blocked[s.sid] = s
                return
            last = s.plain and n == len(out)  # a plain HTTP answer ends with its last DATA frame
            self.out.append(frame(DATA, END_STREAM if last else 0, s.sid, out[:n]))
            out = out[n:]
            self.conn_window -= n
            s.send_window -= n
        s.out = None
        self.blocked.pop(s.sid, None)
        if s.trailers:  # the call's last: a streaming call's answers so far leave it open
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, s.sid, s.trailers))
            self._drop(s.sid)
        elif s.plain:
            if s.receiving():  # answered before the client's end: it may stop sending (RFC 9113 8.1)
                self.out.append(frame(RST_STREAM, 0, s.sid, NO_ERROR.to_bytes(4, "big")))
            self._drop(s.sid, s.receiving())

    def _drop(self, sid: int, reset: bool = False) -> _Stream | None:
        s = self.streams.pop(sid, None)
        if s is not None and s.task is None:
            self._release(s)  # a call under way releases its buffer when it ends
        elif s is not None and s.inbox is not None:
            self._stop_stream(s)  # a streaming call ended from outside its task: it would wait for ever
        self._closed(sid, reset)
        return s

    def _closed(self, sid: int, reset: bool) -> None:
        closed = self.closed
        closed[sid] = reset or closed.get(sid, False)
        if len(closed) > 2 * CLOSED_KEPT:  # the newest CLOSED_KEPT stay (dicts keep insertion order)
            self.closed = dict(list(closed.items())[-CLOSED_KEPT:])

    def _stream_error(self, sid: int, code: int, why: str) -> None:
        """RST_STREAM: the call ends (its task cancelled), the connection goes on."""
        log.info("gRPC stream reset", extra={"reason": why, "http2_error": code, "stream": sid})
        s = self._drop(sid, reset=True)
        self.blocked.pop(sid, None)
        if s is not None and s.task is not None:
            s.task.cancel()
        self.out.append(frame(RST_STREAM, 0, sid, code.to_bytes(4, "big")))

    def _release(self, s: _Stream) -> None:
        if s.body is not None:
            body, s.body = s.body, None
            self._give(body)

    def _give(self, body: Body) -> None:
        """A message's buffer back: out of the connection's and the process's bytes held."""
        self.buffered -= len(body.view)
        self.server.budget.give(len(body.view))
        body.release()

    def _unblock(self) -> None:
        for s in list(self.blocked.values()):
            if self.conn_window <= 0:
                break
            if s.send_window > 0:
                self._send(s)

    def _write(self, acks_wait: bool = False) -> None:
        """Write this turn's frames in one call, PING answers first. With `acks_wait` and nothing else to
        write, PING answers wait while calls are open: their answers will carry them, or the timer."""
        if self.acks and self.transport is not None:
            if acks_wait and not self.out and self.streams:
                if self.ack_timer is None:
                    self.ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._acks_due)
                return
            self.out[:0], self.acks = self.acks, []
        if self.out and self.transport is not None:
            out, self.out = self.out, []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _acks_due(self) -> None:
        self.ack_timer = None
        self._write()

    # -- ending --
    def goaway(self) -> None:
        """No new calls on this connection; the ones under way finish."""
        if not self.goaway_sent and self.transport is not None:
            self.goaway_sent = True
            self.out.append(frame(GOAWAY, 0, 0, self.last_sid.to_bytes(4, "big") + b"\x00\x00\x00\x00"))
            self._write()

    def answering(self) -> bool:
        """Whether a call of this connection is being answered (its handler runs; an answer that waits for
        the client's flow-control window waits for the client)."""
        return any(s.task is not None and not s.task.done() for s in self.streams.values())

    def _fail(self, code: int, why: str) -> None:
        """A connection error: GOAWAY with the reason, then close."""
        log.info("gRPC connection closed", extra={"reason": why, "http2_error": code})
        self.close(code, why)

    def close(self, code: int = NO_ERROR, why: str = "") -> None:
        """GOAWAY (calls after the last one we took may be retried elsewhere), then close (close_then_drop:
        dropped if the client reads nothing of what is still to go out for keepalive_s)."""
        if self.transport is not None:
            payload = self.last_sid.to_bytes(4, "big") + code.to_bytes(4, "big") + why.encode()[:256]
            self.out.append(frame(GOAWAY, 0, 0, payload))
            self._write()
            close_then_drop(self.transport, self.server.keepalive_s)
            self.transport = None


class GrpcServer(Listener):
    """gRPC calls on one port: `handlers` maps ':path' (/package.Service/Method) of a unary call to a
    coroutine from the request message's bytes to the response message's bytes, raising RpcError to end with
    a status; `stream_handlers` does the same for each request message of a bidirectional streaming call,
    whose answers go back as they come (an RpcError ends the whole call)."""

    def __init__(
        self,
        handlers: dict[str, Handler],
        *,
        stream_handlers: dict[str, Handler] | None = None,
        max_message: int = 64 << 20,
        max_buffered: int | None = None,
        buffers: dict[str, Buffer] | None = None,
        keepalive_s: float = 60.0,
        budget: Budget | None = None,
    ) -> None:
        super().__init__()
        self.handlers = handlers
        self.stream_handlers = stream_handlers or {}  # streaming calls: each request message to its answer
        self.keepalive_s = keepalive_s
        self.buffers = buffers or {}
        self.scratch = memoryview(bytearray(READ_CHUNK))  # what every connection's reads land in first
        self.max_message = max_message
        # request bytes a connection may hold for its open calls (memory stays bounded per connection)
        self.max_buffered = max_buffered or max(2 * (max_message + 5), 16 << 20)
        self.budget = budget or Budget(4 * max_message)  # request bytes held by all connections

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def start(self, sock: socket.socket) -> int:
        """Serve on a listening socket (SO_REUSEPORT ones let several processes share the port)."""
        return await self._listen(sock=sock)

    def _stale(self, cutoff: float) -> list[_Connection]:
        # as HTTP/1.1's keep-alive; gRPC clients reconnect for their next call
        return [c for c in self.connections if c.last_active < cutoff and not c.answering()]

    def _expire(self, c: _Connection) -> None:
        c.close(NO_ERROR, f"nothing received for {self.keepalive_s:g} s")

    async def stop(self, grace: float) -> None:
        """GOAWAY to every connection, let the calls under way finish (up to `grace` seconds), close."""
        self._stop_accepting()
        for c in list(self.connections):
            c.goaway()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.streams for c in self.connections) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


def unary(parse: Callable[[Any], Any], method: Callable[[Any, Any], Awaitable[Any]]) -> Handler:
    """A handler around a grpc-style servicer method: parse the request message, call, serialize."""

    async def call(message: memoryview) -> bytes:
        try:
            request = parse(message)
        except Exception as e:
            raise RpcError(INVALID_ARGUMENT, f"request message does not parse: {e}") from None
        reply = await method(request, CONTEXT)
        return bytes(reply.SerializeToString())

    return call


class CallContext:
    """The part of grpc.aio's ServicerContext that our servicer uses: abort raises RpcError."""

    async def abort(self, code: Any, details: str, trailing_metadata: Sequence[tuple[str, str]] = ()) -> None:
        raise RpcError(int(code.value[0]), details, trailing_metadata)

    def time_remaining(self) -> float | None:
        """Seconds until the call's grpc-timeout passes; None without one."""
        deadline = _DEADLINE.get()
        return None if deadline is None else deadline - time.monotonic()


# the time.monotonic() at which the current call's grpc-timeout passes (each call runs in a task of its own)
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("grpc_deadline", default=None)


CONTEXT = CallContext()
