"""The REST protocol's HTTP/1.1 server (runtime.serving.protocol.http1) over real sockets on 127.0.0.1:
framing (keep-alive, pipelining, chunked bodies, 100-continue, HEAD, HTTP/1.0), limits, bodies read into the
buffer the application names, bodies released on every path, and graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from runtime.serving.protocol.http1 import (
    _BUSY,
    HEAD_READ,
    READ_CHUNK,
    Body,
    Budget,
    HttpServer,
    PlainBody,
    Request,
    Response,
    _Connection,
)
from tests.fixtures.polling import until

# every test on asyncio's event loop and on uvloop's (--event-loop)
pytestmark = pytest.mark.usefixtures("each_event_loop")


class EchoApp:
    """GET /x answers at once; POST echoes the body (after `delay` s); bodies go to buffers it keeps."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.buffers: list[bytearray] = []
        self.released = 0
        self.started = asyncio.Event()

    def body_buffer(self, req: Request, length: int) -> Body:
        buf = bytearray(length)
        self.buffers.append(buf)
        app = self

        class Tracked(PlainBody):
            def release(self) -> None:
                app.released += 1

        return Tracked(memoryview(buf))

    def answer_now(self, req: Request) -> Response | None:
        if req.method in ("GET", "HEAD"):
            return 200, b"hello " + req.path.encode(), [(b"content-type", b"text/plain")]
        return None

    async def answer(self, req: Request, body: Body) -> Response:
        self.started.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        return 200, bytes(body.view), [(b"content-type", b"application/octet-stream")]


async def _read_response(r: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    if status == 100:
        return status, headers, b""
    body = await r.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


def _serve(
    app: Any, scenario: Callable[[int, HttpServer], Awaitable[None]], *, max_payload: int = 1 << 20
) -> None:
    async def main() -> None:
        server = HttpServer(app, max_payload=max_payload)
        port = await server.start("127.0.0.1", 0)
        try:
            await scenario(port, server)
        finally:
            await server.stop(1.0)

    asyncio.run(main())


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n%s\r\n" % (path.encode(), len(body), extra)
        + body
    )


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    app = EchoApp()

    async def scenario(port: int, _: HttpServer) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await _read_response(r))[2] == b"hello /a"
        # three requests in one write: a GET, a POST answered later, a GET again
        w.write(b"GET /b HTTP/1.1\r\n\r\n" + _post("/p", b"x" * 1000) + b"GET /c HTTP/1.1\r\n\r\n")
        got = [await _read_response(r) for _ in range(3)]
        assert [g[2] for g in got] == [b"hello /b", b"x" * 1000, b"hello /c"]
        assert all(g[0] == 200 and b"connection" not in g[1] for g in got)
        w.close()

    _serve(app, scenario)
    assert app.released == 1


def test_body_is_read_into_the_applications_buffer_across_many_reads() -> None:
    app = EchoApp()
    payload = bytes(range(256)) * 4096  # 1 MiB: many socket reads

    async def scenario(port: int, _: HttpServer) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        msg = _post("/p", payload)
        for i in range(0, len(msg), 70_001):
            w.write(msg[i : i + 70_001])
            await w.drain()
        status, _, body = await _read_response(r)
        assert status == 200 and body == payload
        w.close()

    _serve(app, scenario, max_payload=2 << 20)
    assert [bytes(b) for b in app.buffers] == [payload]  # the one buffer the app handed out holds it


def test_head_reads_are_small_so_a_large_body_is_read_into_its_buffer_by_the_kernel() -> None:
    """What comes in the same read as a head is copied twice (inbox, then the body's buffer): reads that wait
    for a head are HEAD_READ bytes, and only body reads and pipelined bytes get the large scratch buffer. A
    head larger than one such read (40 KB of headers) and a 600 KB body sent in one write arrive whole."""
    app = EchoApp()
    conn = _Connection(HttpServer(app, max_payload=1 << 20))
    assert len(conn.get_buffer(-1)) == HEAD_READ < READ_CHUNK
    conn.state = _BUSY  # answering: pipelined bytes are read ahead in large reads
    assert len(conn.get_buffer(-1)) == READ_CHUNK
    payload = bytes(range(256)) * 2400

    async def scenario(port: int, _: HttpServer) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post("/p", payload, b"x-big: " + b"a" * 40_000 + b"\r\n"))
        status, _, body = await _read_response(r)
        assert status == 200 and body == payload
        w.close()

    _serve(app, scenario)
    assert [bytes(b) for b in app.buffers] == [payload]


def test_chunked_body_and_expect_100_continue() -> None:
    app = EchoApp()

    async def scenario(port: int, _: HttpServer) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /p HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b"5;ext=1\r\nhello\r\n", b"6\r\n wor", b"ld\r\n", b"0\r\n", b"trailer: x\r\n\r\n"):
            w.write(part)
            await w.drain()
            await asyncio.sleep(0.01)
        assert (await _read_response(r))[2] == b"hello world"
        w.write(b"POST /p HTTP/1.1\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n")
        assert (await _read_response(r))[0] == 100
        w.write(b"abc")
        assert (await _read_response(r))[2] == b"abc"
        w.close()

    _serve(app, scenario)


def test_oversized_body_is_refused_read_and_dropped_and_the_connection_goes_on() -> None:
    app = EchoApp()

    async def scenario(port: int, _: HttpServer) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post("/p", b"y" * 5000) + b"GET /after HTTP/1.1\r\n\r\n")
        status, _, body = await _read_response(r)
        assert status == 413 and b"payload of 5000 bytes exceeds the limit of 4096 bytes" in body
        assert (await _read_response(r))[2] == b"hello /after"
        w.close()

    _serve(app, scenario, max_payload=4096)
    assert app.buffers == []  # never given a buffer


@pytest.mark.parametrize(
    ("request_bytes", "status", "problem"),
    [
        (b"NONSENSE\r\n\r\n", 400, b"malformed request line"),
        (b"GET / HTTP/2.0\r\n\r\n", 505, b"not supported"),
        (b"POST /p HTTP/1.1\r\ncontent-length: ten\r\n\r\n", 400, b"content-length is not an integer"),
        (b"POST /p HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 501, b"gzip is not supported"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, b"malformed header line"),
        (b"GET / HTTP/1.1\r\nx: " + b"a" * 70_000 + b"\r\n\r\n", 431, b"request head larger"),
        (b"POST /p HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", 400, b"malformed chunk size"),
        # what a proxy in front could read otherwise (request smuggling): each refused, the connection closed
        (b"POST /p HTTP/1.1\r\ncontent-length: 0\r\ncontent-length: 5\r\n\r\nhello", 400, b"conflicting"),
        (b"POST /p HTTP/1.1\r\ncontent-length: +5\r\n\r\nhello", 400, b"not an integer"),
        (
            b"POST /p HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            b"both",
        ),
        (
            b"POST /p HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            400,
            b"twice",
        ),
        (b"POST /p HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n", 501, b"only chunked"),
        (b"POST /p HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n-1\r\n", 400, b"malformed chunk size"),
        (b"POST /p HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0x10\r\n", 400, b"malformed chunk size"),
        (b"GET / HTTP/1.1\r\ncontent-length : 5\r\n\r\nhello", 400, b"malformed header line"),
        (b"GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n", 400, b"malformed header line"),  # a folded line
        (b"GET / HTTP/1.1\nhost: x\n\n", 400, b"must end in CRLF"),
        (b"GET / HTTP/1.1\r\nx: a\nb: c\r\n\r\n", 400, b"not in a CRLF"),
        (b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n", 400, b"NUL"),
        (b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400, b"2 Host headers"),
    ],
)
def test_broken_requests_get_an_error_naming_the_problem_and_a_closed_connection(
    request_bytes: bytes, status: int, problem: bytes
) -> None:
    async def scenario(port: int, _: HttpServer) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(request_bytes)
        got, headers, body = await _read_response(r)
        assert got == status and problem in body and headers[b"connection"] == b"close"
        assert await r.read() == b""  # closed
        w.close()

    _serve(EchoApp(), scenario)


def test_head_and_http_1_0() -> None:
    async def scenario(port: int, _: HttpServer) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"HEAD /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        assert b"content-length: 8" in head  # the GET's length, without its body
        assert (await _read_response(r))[2] == b"hello /y"
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /z HTTP/1.0\r\n\r\n")
        status, headers, body = await _read_response(r)
        assert (status, body, headers[b"connection"]) == (200, b"hello /z", b"close")
        assert await r.read() == b""
        w.close()

    _serve(EchoApp(), scenario)


def test_a_body_the_client_abandons_is_released() -> None:
    app = EchoApp()

    async def scenario(port: int, server: HttpServer) -> None:
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post("/p", b"z" * 100_000)[:50_000])
        await w.drain()
        await until(lambda: app.buffers, 1.0)
        w.close()
        await until(lambda: not server.connections, 1.0)

    _serve(app, scenario)
    assert len(app.buffers) == 1 and app.released == 1


def test_a_request_whose_client_left_keeps_its_bytes_counted_until_its_answer_ends() -> None:
    """A client that leaves while its request is being answered: the request's task is cancelled, but its
    body and its bytes in the budget are given back only once the task has ended (the model may hold the
    tensors until then: model._Waker.run), not when the connection goes."""
    release = asyncio.Event()

    class Holding(EchoApp):
        async def answer(self, req: Request, body: Body) -> Response:
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await release.wait()  # as model._Waker.run does: ends once the model let go of the request
                raise
            raise AssertionError("not reached")

    app = Holding()
    budget = Budget(250_000)

    async def scenario(port: int, server: HttpServer) -> None:
        server.budget = budget
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post("/p", b"a" * 100_000))
        await asyncio.wait_for(app.started.wait(), 5)
        w.close()
        await until(lambda: not server.connections, 1.0)
        await asyncio.sleep(0.1)
        assert budget.held == 100_000 and app.released == 0  # still the model's
        release.set()
        assert await until(lambda: not budget.held, 1.0)
        assert app.released == 1

    _serve(app, scenario)


def test_stop_closes_idle_connections_and_lets_answers_in_flight_finish() -> None:
    app = EchoApp(delay=0.3)

    async def scenario(port: int, server: HttpServer) -> None:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        idle_w.write(b"GET /a HTTP/1.1\r\n\r\n")
        await _read_response(idle_r)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post("/p", b"late"))
        await app.started.wait()
        half_r, half_w = await asyncio.open_connection("127.0.0.1", port)
        half_w.write(b"GET /half HTTP/1.1\r\nhost")  # a request begun before the stop
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(server.stop(5.0))
        assert await idle_r.read() == b""  # the idle connection is closed at once
        half_w.write(b": x\r\n\r\n")
        assert (await _read_response(half_r))[2] == b"hello /half"
        assert await half_r.read() == b""
        status, headers, body = await _read_response(r)
        assert (status, body, headers[b"connection"]) == (200, b"late", b"close")
        half_w.close()
        await stopping
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
        w.close()
        idle_w.close()

    _serve(app, scenario)


def test_connections_silent_for_the_keepalive_period_are_closed_unless_being_answered() -> None:
    app = EchoApp(delay=1.6)

    async def scenario(port: int, server: HttpServer) -> None:
        server.keepalive_s = 0.3
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        idle_w.write(b"GET /a HTTP/1.1\r\n\r\n")
        await _read_response(idle_r)
        stalled_r, stalled_w = await asyncio.open_connection("127.0.0.1", port)
        stalled_w.write(b"POST /p HTTP/1.1\r\ncontent-le")  # a head that never ends
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        busy_w.write(_post("/p", b"slow"))  # answered after 1.6 s, longer than the sweep takes
        assert await asyncio.wait_for(idle_r.read(), 3) == b""
        assert await asyncio.wait_for(stalled_r.read(), 3) == b""
        assert (await asyncio.wait_for(_read_response(busy_r), 3))[2] == b"slow"
        for w in (idle_w, stalled_w, busy_w):
            w.close()

    _serve(app, scenario)


def test_a_closed_connection_is_dropped_once_its_client_reads_nothing_for_the_keepalive_period() -> None:
    """An answer larger than the socket buffers waits in the transport for its client to read it. When the
    connection closes (here: the keep-alive sweep, as the client sends nothing more), a client that reads
    slowly still gets all of it; one that reads nothing for keepalive_s is dropped, with the rest (otherwise
    the connection, and the answer, would be held for ever)."""
    app = EchoApp()
    size = 12 << 20

    async def client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for us
        sock.connect(("127.0.0.1", port))
        r, w = await asyncio.open_connection(sock=sock, limit=1 << 16)
        w.write(_post("/p", bytes(size)))
        await w.drain()
        return r, w

    async def read_all(r: asyncio.StreamReader, pause: float) -> int:
        got = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(r.read(1 << 16), 10):
                got += len(chunk)
                await asyncio.sleep(pause)
        return got

    async def scenario(port: int, server: HttpServer) -> None:
        server.keepalive_s = 0.5
        (idle_r, idle_w), (slow_r, slow_w) = await client(port), await client(port)
        slow = asyncio.create_task(read_all(slow_r, 0.002))  # a few KiB at a time, pausing
        await asyncio.sleep(4.0)  # swept after 0.5-1.5 s; the idle one dropped 0.5 s after that
        assert await read_all(idle_r, 0) < size
        assert await slow > size  # the head, and the whole answer
        assert not server.connections
        idle_w.close()
        slow_w.close()

    _serve(app, scenario, max_payload=size)


def test_request_bytes_held_across_connections_are_bounded_by_the_budget() -> None:
    """Bodies being received or answered count against the process's Budget, whatever the connection: past
    its limit a new body is refused with 429 naming the flag before it is read (a chunked one as its chunks
    come), the connection going on; every path gives its bytes back (answered, abandoned mid-body)."""
    app = EchoApp(delay=0.5)
    budget = Budget(250_000)

    async def scenario(port: int, server: HttpServer) -> None:
        server.budget = budget
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, w in held:
            w.write(_post("/p", b"a" * 100_000))  # 200,000 held while answered (0.5 s)
        await asyncio.sleep(0.2)
        assert budget.held == 200_000
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post("/p", b"b" * 100_000))
        status, headers, body = await _read_response(r)
        assert status == 429 and b"--max-inflight-mb" in body and b"0.2 MiB" in body
        assert headers[b"retry-after"] == b"1"
        w.write(b"POST /p HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n" % 60_000 + b"c" * 60_000)
        status, _, body = await _read_response(r)
        assert status == 429 and b"--max-inflight-mb" in body
        for hr, _ in held:
            assert (await _read_response(hr))[2] == b"a" * 100_000
        assert budget.held == 0
        r, w = await asyncio.open_connection("127.0.0.1", port)  # room again
        w.write(_post("/p", b"d" * 100_000))
        assert (await _read_response(r))[2] == b"d" * 100_000
        w.write(_post("/p", b"e" * 100_000)[:50_000])  # then the client leaves mid-body
        await w.drain()
        await asyncio.sleep(0.1)
        assert budget.held == 100_000
        w.close()
        assert await until(lambda: not budget.held, 1.0)

    _serve(app, scenario)


def test_a_request_target_in_absolute_form_is_served_by_its_path() -> None:
    """RFC 9112 3.2.2: servers accept `GET http://host/path` (what a client talking to a proxy sends)."""

    async def scenario(port: int, _: HttpServer) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET http://x:8080/abs?q=1 HTTP/1.1\r\nhost: x\r\n\r\nGET HTTPS://x HTTP/1.1\r\n\r\n")
        assert (await _read_response(r))[2] == b"hello /abs"
        assert (await _read_response(r))[2] == b"hello /"
        w.close()

    _serve(EchoApp(), scenario)
