"""Mutation fuzzing of our HTTP/1.1 and HTTP/2 servers, in-process and deterministic (fixed seeds): valid
request streams (several calls, bodies of many sizes, split over reads of many sizes) with bytes flipped,
cut, inserted and repeated. Whatever arrives, no exception escapes the protocol, nothing is logged as an
error, no task is left pending or dropped with an exception nobody read, and once the connection is gone
every request byte it held is given back to the process's budget."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pytest
from hpack import Encoder

from runtime.serving.protocol import http1, http2
from runtime.serving.protocol.http1 import Body, Budget, HttpServer, PlainBody, Request, Response

SEEDS = 1500


class Sink(asyncio.Transport):
    """A transport that takes every write and reports none buffered."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: Any) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not b:
            break
        i, op = rng.randrange(len(b)), rng.random()
        if op < 0.4:
            b[i] = rng.randrange(256)
        elif op < 0.6:
            del b[i : i + rng.randint(1, 20)]
        elif op < 0.8:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        else:
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randint(1, 50)]
    return bytes(b)


class _Watch:
    """Errors logged and reported by the event loop while a scenario runs."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        watch = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.levelno >= logging.ERROR:
                    watch.problems.append(self.format(record))

        self.handler = Handler()

    def loop_error(self, _: object, context: dict[str, Any]) -> None:
        self.problems.append(
            f"{context.get('message')}: {context.get('exception')!r} {context.get('task')!r}"
        )

    def __enter__(self) -> _Watch:
        logging.getLogger("runtime").addHandler(self.handler)
        return self

    def __exit__(self, *_: object) -> None:
        logging.getLogger("runtime").removeHandler(self.handler)


def _run(scenario: Any) -> None:
    with _Watch() as watch:

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(watch.loop_error)
            for seed in range(SEEDS):
                await scenario(seed)
                assert not watch.problems, (seed, watch.problems[:3])

        asyncio.run(main())
        import gc

        gc.collect()  # a task dropped while pending is reported when collected
        assert not watch.problems, watch.problems[:3]


async def _deliver(conn: asyncio.BufferedProtocol, data: bytes, rng: random.Random) -> None:
    """`data` into the connection as reads of 1 byte to 1 MiB, the loop turning now and then; the
    connection's calls left to run, then the connection lost."""
    view = memoryview(data)
    while len(view) and getattr(conn, "transport", None) is not None:
        buf = conn.get_buffer(-1)
        n = min(len(view), len(buf), rng.choice([1, 9, 100, 4096, 1 << 20]))
        buf[:n] = view[:n]
        conn.buffer_updated(n)
        view = view[n:]
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)
    conn.connection_lost(None)
    for _ in range(5):
        await asyncio.sleep(0)


def _h2_calls(rng: random.Random) -> bytes:
    enc = Encoder()
    out = [http2.PREFACE, http2.frame(http2.SETTINGS, 0, 0, bytes.fromhex("000400010000"))]
    for sid in range(1, 2 * rng.randint(1, 5), 2):
        path = rng.choice(["/t.E/Echo", "/t.E/Stream", "/t.E/Fail", "/none"])
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x")]
        fields += [("content-type", "application/grpc"), ("te", "trailers")]
        if rng.random() < 0.2:
            fields.append(("grpc-timeout", "1S"))
        if rng.random() < 0.1:
            fields.append(("content-length", str(rng.randint(0, 20))))
        out.append(http2.frame(http2.HEADERS, http2.END_HEADERS, sid, enc.encode(fields)))
        size = rng.choice([0, 3, 100, 20000, 70000])  # the last past max_message
        body = b"\x00" + size.to_bytes(4, "big") + bytes(size)
        step = rng.choice([1, 7, 16384, 100000])
        for i in range(0, len(body), step):
            flags = http2.END_STREAM if i + step >= len(body) else 0
            out.append(http2.frame(http2.DATA, flags, sid, body[i : i + step]))
        for kind, payload in ((http2.RST_STREAM, (8).to_bytes(4, "big")), (http2.PING, bytes(8))):
            if rng.random() < 0.2:
                out.append(http2.frame(kind, 0, sid if kind == http2.RST_STREAM else 0, payload))
    return b"".join(out)


@pytest.mark.timeout(300)
def test_http2_survives_mutated_call_streams() -> None:
    async def echo(message: memoryview) -> bytes:
        return bytes(message)[:10]

    async def fail(message: memoryview) -> bytes:
        raise http2.RpcError(5, "no")

    async def scenario(seed: int) -> None:
        rng = random.Random(seed)
        server = http2.GrpcServer(
            {"/t.E/Echo": echo, "/t.E/Fail": fail},
            stream_handlers={"/t.E/Stream": echo},
            max_message=1 << 16,
            budget=Budget(1 << 20),
        )
        conn = http2._Connection(server)
        conn.connection_made(Sink())
        data = _h2_calls(rng)
        if rng.random() < 0.9:  # the preface stays: past it is where the protocol's own code runs
            data = data[: len(http2.PREFACE)] + _mutate(rng, data[len(http2.PREFACE) :])
        await _deliver(conn, data, rng)
        assert server.budget.held == 0, (seed, server.budget.held)

    _run(scenario)


class _App:
    """GET answers at once; POST echoes the first bytes of its body after a turn of the loop."""

    def __init__(self) -> None:
        self.bodies = 0

    def body_buffer(self, req: Request, length: int) -> Body:
        app = self
        app.bodies += 1

        class Counted(PlainBody):
            def release(self) -> None:
                app.bodies -= 1

        return Counted(memoryview(bytearray(length)))

    def answer_now(self, req: Request) -> Response | None:
        return (200, b"ok", []) if req.method == "GET" else None

    async def answer(self, req: Request, body: Body) -> Response:
        await asyncio.sleep(0)
        return 200, bytes(body.view[:10]), []


def _h1_requests(rng: random.Random) -> bytes:
    out = []
    for _ in range(rng.randint(1, 5)):
        body = bytes(rng.choice([0, 5, 300, 5000]))
        if rng.random() < 0.2:
            out.append(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
        elif rng.random() < 0.3:
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 97]), body[i : i + 97]) for i in range(0, len(body), 97)
            )
            out.append(
                b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
            )
        else:
            out.append(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    return b"".join(out)


@pytest.mark.timeout(300)
def test_http1_survives_mutated_request_streams() -> None:
    async def scenario(seed: int) -> None:
        rng = random.Random(seed)
        app = _App()
        server = HttpServer(app, max_payload=4096, budget=Budget(1 << 20))
        conn = http1._Connection(server)
        conn.connection_made(Sink())
        data = _h1_requests(rng)
        if rng.random() < 0.9:
            data = _mutate(rng, data)
        await _deliver(conn, data, rng)
        assert server.budget.held == 0 and app.bodies == 0, (seed, server.budget.held, app.bodies)

    _run(scenario)
