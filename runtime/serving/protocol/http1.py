"""HTTP/1.1 for the REST protocol: a small asyncio server shaped for what an inference server receives.

Why not uvicorn: a 602 KB image went through six copies there (asyncio's 256 KiB reads, httptools' bytes,
uvicorn's bytearray, bytes() at receive, our own buffer, the shared-memory slot) and every request through an
ASGI scope, a task and message dicts. Here a request's head is parsed in Python (a few headers), and its body
is read by the kernel straight into the buffer that will hold it (asyncio.BufferedProtocol): with protocol
workers that is a slot of the shared-memory arena, so an image is copied once between the socket and the
GPU's DMA. GET routes are answered without a task.

What it speaks: HTTP/1.0 and 1.1, keep-alive, pipelined requests (answered in order, one at a time),
Content-Length and chunked bodies, `Expect: 100-continue`, HEAD. Limits: heads of at most 64 KiB (431),
bodies of at most the server's max payload (413; a declared body up to 64 MiB is read and dropped so the
client sees the answer, a larger one closes the connection). A connection that sends nothing for
`keepalive_s` while not being answered is closed (idle keep-alive, or a client stalled mid-request).
Shutdown stops accepting, closes connections between requests, lets requests that have begun to arrive finish
(up to a grace period) and closes each connection after its last answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol, cast

import orjson

log = logging.getLogger(__name__)

MAX_HEAD = 64 << 10
DISCARD_LIMIT = 64 << 20
READ_CHUNK = 256 << 10  # one socket read at most (HTTP/1.1 and HTTP/2 alike)
# a read while waiting for a head: what comes with the head is copied twice (into the inbox, then into the
# body's buffer), what comes after it is read straight into the body's buffer; 16 KiB holds a typical head
# and a small request whole, and leaves a 602 KB image's body to the kernel's one copy (reads of up to 256 KiB
# copied ~512 KB per image: 6.8 % of a protocol worker's samples on the H200 host, tinyimage, 13,000 rows/s)
HEAD_READ = 16 << 10

Headers = list[tuple[bytes, bytes]]
Response = tuple[int, bytes, Headers]


@dataclass
class Request:
    method: str
    path: str
    headers: Headers  # names lower-case
    version: bytes = b"HTTP/1.1"
    keep_alive: bool = True
    length: int | None = None  # Content-Length; None: chunked

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class Body(Protocol):
    """Where a request's body is read to: `view` is exactly the body's length; `release` is called once the
    request is answered (or failed)."""

    view: memoryview

    def release(self) -> None: ...


@dataclass
class PlainBody:
    view: memoryview

    def release(self) -> None:
        pass


class App(Protocol):
    def answer_now(self, req: Request) -> Response | None:
        """The response, when it needs no waiting (health, metadata); None: call `answer`."""

    def answer(self, req: Request, body: Body) -> Awaitable[Response]: ...

    def body_buffer(self, req: Request, length: int) -> Body:
        """Where to read a body of `length` bytes (called once the length is known, before it is read)."""


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


JSON = [(b"content-type", b"application/json")]  # the headers of a JSON answer
# a 429 is overload (a full queue, the process's request bytes): clients that honour Retry-After (urllib3's
# Retry; Envoy's rate-limited retry back-off, when set to) wait a second instead of sending again at once
_OVERLOADED = [*JSON, (b"retry-after", b"1")]


def error_response(status: int, message: str) -> Response:
    return status, orjson.dumps({"error": message}), _OVERLOADED if status == 429 else JSON


_EMPTY = PlainBody(memoryview(b""))
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_HEAD, _BODY, _CHUNKED, _DISCARD, _BUSY = range(5)


class Budget:
    """Request bytes one process holds at once, across its connections and protocols (HTTP/1.1 and gRPC):
    bodies being received, queued or answered. Past `limit` a new request is refused (429 /
    RESOURCE_EXHAUSTED) before its bytes are read: the per-request and per-connection limits alone let
    many connections together hold any amount. One request of the largest allowed size always fits."""

    def __init__(self, limit: int, on_refuse: Callable[[str], object] | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.on_refuse = on_refuse  # called with the protocol ("rest", "grpc") of each refusal

    def take(self, n: int, protocol: str) -> bool:
        if self.held + n > self.limit and self.held:
            if self.on_refuse is not None:
                self.on_refuse(protocol)
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n

    def refusal(self, n: int) -> str:
        mib = 1 << 20
        return (
            f"the server holds {self.held / mib:.1f} MiB of requests (its limit: {self.limit / mib:.0f} MiB, "
            f"--max-inflight-mb); this one needs {n / mib:.1f} MiB more: retry shortly, or spread the load"
        )


@dataclass
class _Chunked:
    out: bytearray = field(default_factory=bytearray)
    remaining: int = -1  # data bytes left in the current chunk (then its CRLF); -1: expecting a size line
    trailers: bool = False


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.transport: asyncio.Transport | None = None
        self.inbox = bytearray()  # bytes read but not consumed: heads, pipelined requests, chunked bodies
        self.state = _HEAD
        self.req: Request | None = None
        self.body: Body | None = None
        self.filled = 0
        self.held = 0  # bytes of the budget this connection's request holds
        self.discard = 0
        self.chunked: _Chunked | None = None
        self.last_active = time.monotonic()
        self.closing = False  # close once the current request is answered
        self.write_paused = False
        self.read_paused = False
        self.task: asyncio.Task[None] | None = None
        self._advancing = False

    # -- asyncio --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport instances
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        self.transport = None
        if self.state == _BODY and self.body is not None:  # the client left half-way through a body
            self.body.release()
            self.body = None
        if self.task is None:
            self._give_back()
            return
        # the request being answered: its body and bytes are given back when its task ends, which may be
        # later than now (model._Waker.run, frontend.Worker.infer: until the model let go of the request)
        body = self.body
        self.task.add_done_callback(lambda _: self._ended(body))
        self.task.cancel()

    def _ended(self, body: Body | None) -> None:
        if body is not None:
            body.release()
        self._give_back()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.state == _BODY:
            assert self.body is not None
            return self.body.view[self.filled :]
        return self.server.scratch[:HEAD_READ] if self.state == _HEAD else self.server.scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.last_active = time.monotonic()
        if self.state == _BODY:
            self.filled += nbytes
            if self.filled == len(self.body.view):  # type: ignore[union-attr]
                self._dispatch()
            return
        self.inbox += self.server.scratch[:nbytes]
        if self.state == _BUSY:
            if len(self.inbox) > MAX_HEAD and self.transport is not None and not self.read_paused:
                self.read_paused = True  # a client pipelining far ahead waits for our answers
                self.transport.pause_reading()
            return
        self._advance()

    def eof_received(self) -> bool | None:
        return None  # close; an answer in progress is dropped with the connection

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.state not in (_BUSY, _BODY):  # BUSY and BODY go on by themselves
            self._advance()

    # -- parsing --
    def _advance(self) -> None:
        """Consume what the inbox holds: heads, bodies that came with them, chunked bodies, discards."""
        if self._advancing:
            return  # an answer given synchronously inside the loop below: the loop goes on
        self._advancing = True
        try:
            self._consume()
        finally:
            self._advancing = False

    def _consume(self) -> None:
        while self.transport is not None and not self.write_paused:
            if self.state == _HEAD and not self.inbox and (self.closing or self.server.stopping):
                self.close()  # stopping, and between requests: the last answer on this connection is out
                return
            if self.state == _DISCARD:
                n = min(self.discard, len(self.inbox))
                del self.inbox[:n]
                self.discard -= n
                if self.discard:
                    return
                self.state = _HEAD
            elif self.state == _CHUNKED:
                if not self._chunks():
                    return
                continue
            elif self.state != _HEAD:
                return
            end = self.inbox.find(b"\r\n\r\n")
            if end > MAX_HEAD or (end < 0 and len(self.inbox) > MAX_HEAD):
                self._fail(431, f"request head larger than {MAX_HEAD} bytes")
                return
            if end < 0:
                if b"\n\n" in self.inbox:  # a head of bare LFs: it would never end
                    self._fail(400, "request head lines must end in CRLF")
                return
            head = bytes(self.inbox[:end])
            del self.inbox[: end + 4]
            try:
                self.req = _parse_head(head)
                self._start_body()
            except HttpError as e:
                self._fail(e.status, e.message)
                return

    def _start_body(self) -> None:
        req = self.req
        assert req is not None and self.transport is not None
        limit, n = self.server.max_payload, req.length
        if n is not None and n > limit:
            self._refuse_body(n, f"payload of {n} bytes exceeds the limit of {limit} bytes")
            return
        if n and not self.server.budget.take(n, "rest"):
            self._refuse_body(n, self.server.budget.refusal(n), 429)
            return
        self.held = n or 0
        if n != 0 and req.header(b"expect") == b"100-continue":  # a body we will read (chunked: n is None)
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if n is None:
            self.chunked = _Chunked()
            self.state = _CHUNKED
            return
        self.body = self.app.body_buffer(req, n) if n else _EMPTY
        have = min(n, len(self.inbox))
        if have:
            self.body.view[:have] = self.inbox[:have]
            del self.inbox[:have]
        self.filled = have
        if have == n:
            self._dispatch()
        else:
            self.state = _BODY

    def _chunks(self) -> bool:
        """Decode what the inbox holds of a chunked body; True once the request is complete or failed."""
        c = self.chunked
        assert c is not None
        while True:
            if c.remaining < 0:  # a chunk-size line, or a trailer line after the last chunk
                eol = self.inbox.find(b"\r\n")
                if eol < 0:
                    if len(self.inbox) > MAX_HEAD:
                        self._fail(400, "chunk size line too long")
                        return True
                    return False
                line = bytes(self.inbox[:eol])
                del self.inbox[: eol + 2]
                if c.trailers:
                    if line:
                        continue  # a trailer field: ignored
                    self.chunked = None
                    self.body = PlainBody(memoryview(c.out))
                    self._dispatch()
                    return True
                digits = line.split(b";", 1)[0].strip()
                if not 0 < len(digits) <= 15 or digits.strip(HEX_DIGITS):  # 1*HEXDIG, nothing else
                    self._fail(400, f"malformed chunk size {line[:40]!r}")
                    return True
                size = int(digits, 16)
                if size == 0:
                    c.trailers = True
                    continue
                if len(c.out) + size > self.server.max_payload:
                    self._fail(413, f"payload exceeds the limit of {self.server.max_payload} bytes")
                    return True
                if not self.server.budget.take(size, "rest"):
                    self._fail(429, self.server.budget.refusal(size))
                    return True
                self.held += size
                c.remaining = size
            if c.remaining > 0:
                take = min(c.remaining, len(self.inbox))
                c.out += self.inbox[:take]
                del self.inbox[:take]
                c.remaining -= take
                if c.remaining:
                    return False
            if len(self.inbox) < 2:  # the CRLF that ends a chunk's data
                return False
            if self.inbox[:2] != b"\r\n":
                self._fail(400, "chunk data not followed by CRLF")
                return True
            del self.inbox[:2]
            c.remaining = -1

    def _refuse_body(self, n: int, message: str, status: int = 413) -> None:
        """Answer at once; read and drop a body of reasonable size so the client reads the answer."""
        assert self.req is not None
        self.req.keep_alive = self.req.keep_alive and n <= DISCARD_LIMIT
        self._write(self.req, error_response(status, message))
        if self.transport is None or not self.req.keep_alive:
            return
        self.discard = n
        self.state = _DISCARD

    # -- answering --
    def _dispatch(self) -> None:
        req, body = self.req, self.body
        assert req is not None and body is not None
        self.state = _BUSY
        try:
            now = self.app.answer_now(req)
        except Exception as e:
            log.exception("request failed", extra={"path": req.path})
            now = error_response(500, f"internal error: {e}")
        if now is not None:
            self._done(req, body, now)
            return
        self.task = asyncio.get_running_loop().create_task(self._run(req, body))

    async def _run(self, req: Request, body: Body) -> None:
        try:
            resp = await self.app.answer(req, body)
        except Exception as e:
            log.exception("request failed", extra={"path": req.path})
            resp = error_response(500, f"internal error: {e}")
        self.task = None
        self._done(req, body, resp)

    def _done(self, req: Request, body: Body, resp: Response) -> None:
        body.release()
        self._give_back()
        self.body = None
        self.req = None
        self.filled = 0
        self._write(req, resp)
        if self.transport is None:
            return
        self.state = _HEAD
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.inbox:
            self._advance()

    def _write(self, req: Request, resp: Response) -> None:
        if self.transport is None:
            return
        status, payload, headers = resp
        keep = req.keep_alive and not self.closing and not self.server.stopping
        head = [b"%s %d %s\r\n" % (b"HTTP/1.1", status, _REASONS.get(status, b"Unknown"))]
        head += [k + b": " + v + b"\r\n" for k, v in headers]
        head.append(b"content-length: %d\r\n" % len(payload))
        if not keep:
            head.append(b"connection: close\r\n")
        elif req.version == b"HTTP/1.0":
            head.append(b"connection: keep-alive\r\n")
        head.append(b"\r\n")
        if req.method != "HEAD":
            head.append(payload)
        self.transport.write(b"".join(head))
        self.last_active = time.monotonic()
        if not keep:
            close_then_drop(self.transport, self.server.keepalive_s)
            self.transport = None
            self.server.connections.discard(self)

    def _fail(self, status: int, message: str) -> None:
        """A request we cannot parse: answer and close (the stream's framing is lost)."""
        req = Request("GET", "", [], keep_alive=False)
        self._write(req, error_response(status, message))

    def _give_back(self) -> None:
        if self.held:
            self.server.budget.give(self.held)
            self.held = 0

    # -- server --
    @property
    def answering(self) -> bool:
        """A request of this connection is being answered (everything else may be cut off)."""
        return self.state == _BUSY

    def close(self) -> None:
        if self.transport is not None:
            close_then_drop(self.transport, self.server.keepalive_s)
            self.transport = None
        self.server.connections.discard(self)


def _parse_head(head: bytes) -> Request:
    """A request head (RFC 9112), refused with 400 wherever two parsers could read it differently (a proxy in
    front and this server: request smuggling): bare LF, NUL or CR in a line, whitespace before a field's
    colon or folded lines, a content-length that is not one number, transfer-encoding other than chunked
    once, both of them, more than one Host."""
    lines = head.split(b"\r\n")
    crlf = len(lines) - 1
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf or b"\x00" in head:
        raise HttpError(400, "request head with a NUL, or a CR or LF not in a CRLF")
    try:
        method, target, version = lines[0].split(b" ")
    except ValueError:
        raise HttpError(400, f"malformed request line {lines[0][:80]!r}") from None
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505, f"HTTP version {version[:20]!r} is not supported")
    if not method or not target:
        raise HttpError(400, f"malformed request line {lines[0][:80]!r}")
    headers: Headers = []
    length: int | None = None
    chunked = False
    hosts = 0
    conn = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1] in _SP_HT or name[0] in _SP_HT:  # (folded lines start so)
            raise HttpError(400, f"malformed header line {line[:80]!r}")
        name = name.lower()
        value = value.strip()
        headers.append((name, value))
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise HttpError(400, f"header content-length is not an integer: {value[:40]!r}")
            if length is not None and int(value) != length:
                raise HttpError(400, "conflicting content-length headers")
            length = int(value)
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked":
                coding = value[:40].decode(errors="replace")
                raise HttpError(501, f"transfer-encoding {coding} is not supported (only chunked)")
            if chunked:
                raise HttpError(400, "transfer-encoding chunked given twice")
            chunked = True
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            conn = value.lower()
    if hosts > 1:  # none is let through (RFC 9112 says 400): raw probes omit it, and no route depends on it
        raise HttpError(400, f"{hosts} Host headers: give one")
    if chunked:
        if length is not None:
            raise HttpError(400, "both content-length and transfer-encoding: chunked")
    elif length is None:
        length = 0
    keep = b"close" not in conn if version == b"HTTP/1.1" else b"keep-alive" in conn
    if target[0] != 47 and target[:4].lower() == b"http":  # absolute form (not "/..."): its path
        target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
    path = target.split(b"?", 1)[0].decode("latin-1")
    return Request(method.decode("latin-1"), path, headers, version, keep, length)


HEX_DIGITS = b"0123456789abcdefABCDEF"
_SP_HT = (32, 9)


def close_then_drop(transport: asyncio.BaseTransport, period: float) -> None:
    """Close `transport`: what we wrote still goes out first, as slowly as its client reads; but once a
    whole `period` passes with none of it reaching the client, drop it (a client that reads nothing would
    keep the connection, and every byte written for it, for ever)."""
    transport = cast(asyncio.WriteTransport, transport)  # uvloop's are not asyncio.WriteTransport instances
    held = transport.get_write_buffer_size()
    transport.close()
    if not held:
        return  # closed at once; the kernel sends what it holds
    loop = asyncio.get_running_loop()

    def check(left: int) -> None:
        now = _undelivered(transport)
        if transport.get_write_buffer_size() and now >= left:
            transport.abort()
        elif transport.get_write_buffer_size():
            loop.call_later(period, check, now)

    loop.call_later(period, check, _undelivered(transport))


def _undelivered(transport: asyncio.WriteTransport) -> int:
    """Bytes written to `transport` that its client has not taken yet: the transport's buffer, and the
    kernel's send queue (Linux's TIOCOUTQ; without it the buffer alone, which the kernel refills from only
    once a good part of its queue is gone)."""
    n = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            n += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return n


class Listener:
    """What HttpServer and GrpcServer share: their open connections, the sweep that closes the idle ones, and
    the two ways connections come: accepted from a listening socket, or dealt one at a time (`adopt`, the
    sockets a protocol worker is handed by the model process, see runtime.serving.hub)."""

    keepalive_s: float

    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.stopping = False
        self.on_close: Callable[[], object] | None = None  # told of every connection that ends
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def _connection(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    def _stale(self, cutoff: float) -> list[Any]:
        """The connections to close: nothing received since `cutoff`, nothing being answered."""
        raise NotImplementedError

    def _expire(self, c: Any) -> None:
        raise NotImplementedError

    async def _listen(self, **where: Any) -> int:
        """Accept connections (`where`: a listening `sock`, or `host` and `port`); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, backlog=2048, **where)
        self.start_sweeping()
        return int(self._server.sockets[0].getsockname()[1])

    def start_sweeping(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere (its client may be gone already: then it ends at once)."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._connection, sock)
        except OSError:
            sock.close()
            self._closed()  # counted as opened by whoever dealt it

    def forget(self, c: object) -> None:
        """A connection ended (its protocol's connection_lost)."""
        self.connections.discard(c)
        self._closed()

    def _closed(self) -> None:
        if self.on_close is not None:
            self.on_close()

    def _sweep(self) -> None:
        """Close connections that sent nothing for keepalive_s while not being answered: idle keep-alive
        ones, and clients stalled in the middle of a request (whose bytes so far are held for them)."""
        for c in self._stale(time.monotonic() - self.keepalive_s):
            self._expire(c)
        if not self.stopping:
            self.start_sweeping()

    def _stop_accepting(self) -> None:
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()


class HttpServer(Listener):
    def __init__(
        self, app: App, *, max_payload: int, keepalive_s: float = 60.0, budget: Budget | None = None
    ) -> None:
        super().__init__()
        self.app = app
        self.max_payload = max_payload
        self.budget = budget or Budget(4 * max_payload)
        self.keepalive_s = keepalive_s
        self.scratch = memoryview(bytearray(READ_CHUNK))  # what heads are read into (one loop: one at a time)

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        """Listen on host:port, or on `sock` (a listening socket); returns the port."""
        if sock is not None:
            return await self._listen(sock=sock)
        return await self._listen(host=host, port=port, reuse_address=True)

    def _stale(self, cutoff: float) -> list[_Connection]:
        return [c for c in self.connections if not c.answering and c.last_active < cutoff]

    def _expire(self, c: _Connection) -> None:
        c.close()

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; idle connections close now, busy ones after their answer (at most grace_s)."""
        self._stop_accepting()
        await asyncio.sleep(0)  # take in what already arrived on open connections (a busy loop lags)
        for c in list(self.connections):
            if c.state == _HEAD and not c.inbox:  # between requests
                c.close()
            else:
                c.closing = True
        deadline = time.monotonic() + grace_s
        while self.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for c in list(self.connections):
            c.close()
