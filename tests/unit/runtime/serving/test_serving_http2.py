"""gRPC over our own HTTP/2 (runtime.serving.protocol.http2), driven by grpcio's client over real sockets on
127.0.0.1: messages larger than every flow-control window both ways, many calls on one connection, status
codes (unknown method, oversized and compressed messages, deadlines), cancellation, garbage on the port and
graceful stop; and the wire helpers (HPACK integers, grpc-message, grpc-timeout, the raw-contents split)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import grpc
import pytest

from runtime.serving.frontend import listen_socket
from runtime.serving.protocol import http2
from runtime.serving.protocol.http1 import Budget
from runtime.serving.protocol.http2 import GrpcServer, RpcError
from runtime.serving.protocol.protowire import RAW_INPUT_CONTENTS, field_start, split_field
from tests.fixtures.polling import until

# every test on asyncio's event loop and on uvloop's (--event-loop)
pytestmark = pytest.mark.usefixtures("each_event_loop")


class Echo:
    """/t.E/Echo answers its request reversed (after `delay` s); /t.E/Fail ends with a status."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    def handlers(self) -> dict[str, http2.Handler]:
        async def echo(message: memoryview) -> bytes:
            self.started.set()
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return bytes(message)[::-1]

        async def fail(message: memoryview) -> bytes:
            raise RpcError(5, f"no model named {bytes(message).decode()!r} — try ünïcode")

        return {"/t.E/Echo": echo, "/t.E/Fail": fail}


def _late(seconds: float) -> http2.Handler:
    """A handler that answers b"late" after `seconds`."""

    async def late(message: memoryview) -> bytes:
        await asyncio.sleep(seconds)
        return b"late"

    return late


def _serve(
    app: Echo | dict[str, http2.Handler],
    scenario: Callable[[str, GrpcServer], Awaitable[None]],
    *,
    timeout: float = 60,
    **server_options: Any,
) -> None:
    """Serve `app`'s handlers (or the handlers given) on a free port of 127.0.0.1 while `scenario` runs."""
    handlers = app.handlers() if isinstance(app, Echo) else app
    server_options.setdefault("max_message", 16 << 20)

    async def main() -> None:
        server = GrpcServer(handlers, **server_options)
        port = await server.start(listen_socket("127.0.0.1", 0, listen=True))
        try:
            await asyncio.wait_for(scenario(f"127.0.0.1:{port}", server), timeout)
        finally:
            await server.stop(1.0)

    asyncio.run(main())


def _channel(target: str) -> grpc.aio.Channel:
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    return grpc.aio.insecure_channel(target, options=opts)


def test_messages_larger_than_every_window_travel_both_ways() -> None:
    payload = os.urandom(5 << 20)  # 5 MiB: past grpcio's 64 KiB initial windows and our 1 MiB frames

    async def scenario(target: str, _: GrpcServer) -> None:
        async with _channel(target) as ch:
            call = ch.unary_unary("/t.E/Echo")
            assert await call(payload) == payload[::-1]
            assert await call(b"") == b""  # an empty message is still one message
            assert await call(payload[:100]) == payload[:100][::-1]

    _serve(Echo(), scenario)


def test_many_concurrent_calls_on_one_connection_each_get_their_answer() -> None:
    async def scenario(target: str, _: GrpcServer) -> None:
        async with _channel(target) as ch:
            call = ch.unary_unary("/t.E/Echo")
            msgs = [os.urandom(1 + i * 97 % 70000) for i in range(300)]
            got = await asyncio.gather(*(call(m) for m in msgs))
            assert got == [m[::-1] for m in msgs]

    _serve(Echo(delay=0.01), scenario)


def test_statuses_name_the_problem() -> None:
    async def scenario(target: str, _: GrpcServer) -> None:
        async with _channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/t.E/Nope")(b"x")
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "/t.E/Nope" in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/t.E/Fail")(b"bert")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert e.value.details() == "no model named 'bert' — try ünïcode"  # percent-encoded and back
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/t.E/Echo")(b"y" * 5000)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4096 bytes" in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:  # ~200 bytes on the wire, 100 KB inflated
                await ch.unary_unary("/t.E/Echo")(b"z" * 100_000, compression=grpc.Compression.Gzip)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "inflates past the server's limit of 4096 bytes (--max-payload-mb)" in e.value.details()
            assert await ch.unary_unary("/t.E/Echo")(b"still fine") == b"enif llits"  # same connection

    _serve(Echo(), scenario, max_message=4096)


def test_compressed_request_messages_are_inflated_and_their_bytes_given_back() -> None:
    """grpcio's gzip and deflate (tritonclient.grpc's compression_algorithm): unary and streaming calls get
    their answers (uncompressed), and the inflated bytes held against the budget are given back."""

    async def scenario(target: str, server: GrpcServer) -> None:
        async with _channel(target) as ch:
            for c in (grpc.Compression.Gzip, grpc.Compression.Deflate):
                msg = os.urandom(3000) + b"z" * 300_000
                assert await ch.unary_unary("/t.E/Echo")(msg, compression=c) == msg[::-1]
                call = ch.stream_stream("/t.E/Stream")(compression=c)
                for i in range(3):
                    await call.write(msg[: 1000 * (i + 1)])
                await call.done_writing()
                got = sorted([m async for m in call], key=len)
                assert got == [msg[: 1000 * (i + 1)][::-1] for i in range(3)]
            assert server.budget.held == 0

    cancelled = asyncio.Event()
    _serve(Echo(), scenario, stream_handlers=_stream_handlers(cancelled))


def test_request_bytes_held_per_connection_are_bounded() -> None:
    """Calls that would hold more request bytes than the connection may are refused, the others answered,
    and the bytes count again once answered."""

    async def scenario(target: str, _: GrpcServer) -> None:
        async with _channel(target) as ch:
            call = ch.unary_unary("/t.E/Echo")
            msg = os.urandom(1 << 20)
            got = await asyncio.gather(*(call(msg) for _ in range(6)), return_exceptions=True)
            refused = [g for g in got if isinstance(g, grpc.aio.AioRpcError)]
            assert 1 <= len(refused) <= 5 and sum(g == msg[::-1] for g in got) == 6 - len(refused)
            for e in refused:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "in flight on this connection" in e.details()
            assert await asyncio.gather(*(call(msg) for _ in range(2))) == [msg[::-1]] * 2

    _serve(Echo(delay=0.3), scenario, timeout=30, max_message=2 << 20, max_buffered=(5 << 19) + 64)


def test_request_bytes_held_across_connections_are_bounded_by_the_budget() -> None:
    """Calls on several connections share the process's Budget (one per process, with HTTP/1.1): past it a
    call is refused with RESOURCE_EXHAUSTED naming the flag, whatever its connection; the bytes count again
    once answered, and a cancelled call gives its bytes back too."""
    budget = Budget(5 << 19)  # 2.5 MiB: two 1 MiB calls, not three

    async def scenario(target: str, _: GrpcServer) -> None:
        chans = [_channel(target) for _ in range(3)]
        try:
            msg = os.urandom(1 << 20)
            calls = [ch.unary_unary("/t.E/Echo")(msg) for ch in chans]
            got = await asyncio.gather(*calls, return_exceptions=True)
            refused = [g for g in got if isinstance(g, grpc.aio.AioRpcError)]
            assert len(refused) == 1 and got.count(msg[::-1]) == 2
            assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-inflight-mb" in refused[0].details()
            assert budget.held == 0
            pending = chans[0].unary_unary("/t.E/Echo")(msg)
            await asyncio.sleep(0.1)
            assert budget.held == len(msg) + 5  # held while answered (0.3 s)
            pending.cancel()
            assert await until(lambda: not budget.held, 1.0)
        finally:
            for ch in chans:
                await ch.close()

    _serve(Echo(delay=0.3), scenario, timeout=30, max_message=2 << 20, budget=budget)


def test_a_handler_reads_its_own_calls_time_remaining() -> None:
    """The servicer's context tells each call the seconds left of its own grpc-timeout (what the batcher uses
    to drop requests that cannot be answered in time), and None without one, concurrent calls apart."""

    async def remaining(message: memoryview) -> bytes:
        await asyncio.sleep(0.05)  # the calls overlap
        left = http2.CONTEXT.time_remaining()
        return b"none" if left is None else f"{left:.3f}".encode()

    async def scenario(target: str, _: GrpcServer) -> None:
        async with _channel(target) as ch:
            call = ch.unary_unary("/t.E/Left")
            got = await asyncio.gather(call(b"", timeout=20), call(b""), call(b"", timeout=5))
            assert got[1] == b"none"
            # grpcio rounds the grpc-timeout it sends up (20 s may go as 20,050 ms)
            assert 19 < float(got[0]) <= 21 and 4 < float(got[2]) <= 5.5, got

    _serve({"/t.E/Left": remaining}, scenario)


def test_deadline_and_cancellation_end_the_handler_and_the_connection_goes_on() -> None:
    app = Echo(delay=5.0)

    async def scenario(target: str, _: GrpcServer) -> None:
        async with _channel(target) as ch:
            call = ch.unary_unary("/t.E/Echo")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(b"slow", timeout=0.3)  # grpc-timeout: the server cancels its side too
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(app.cancelled.wait(), 5)
            app.cancelled.clear()
            app.started.clear()
            pending = call(b"abandoned")
            await asyncio.wait_for(app.started.wait(), 5)
            pending.cancel()  # RST_STREAM
            await asyncio.wait_for(app.cancelled.wait(), 5)
            app.delay = 0.0
            assert await call(b"ab") == b"ba"

    _serve(app, scenario)


def test_garbage_on_the_port_closes_that_connection_only() -> None:
    async def scenario(target: str, _: GrpcServer) -> None:
        host, port = target.split(":")
        r, w = await asyncio.open_connection(host, int(port))
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        data = await asyncio.wait_for(r.read(), 5)  # our SETTINGS, then GOAWAY PROTOCOL_ERROR, then EOF
        assert b"connection preface" in data
        w.close()
        async with _channel(target) as ch:
            assert await ch.unary_unary("/t.E/Echo")(b"ok") == b"ko"

    _serve(Echo(), scenario)


def test_stop_lets_calls_under_way_finish_and_takes_no_new_connections() -> None:
    app = Echo(delay=0.5)

    async def scenario(target: str, server: GrpcServer) -> None:
        async with _channel(target) as ch:
            call = ch.unary_unary("/t.E/Echo")
            under_way = asyncio.ensure_future(call(b"in flight"))
            await asyncio.wait_for(app.started.wait(), 5)
            await server.stop(5.0)
            assert await under_way == b"thgilf ni"
        host, port = target.split(":")
        with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
            pass

    _serve(app, scenario)


def test_wire_helpers() -> None:
    assert http2._hpack_int(10, 5) == b"\x0a"
    assert http2._hpack_int(1337, 5) == b"\x1f\x9a\x0a"  # RFC 7541 C.1.2
    assert http2.percent_encode("a b%c\n") == b"a b%25c%0A"
    assert http2.parse_timeout("100m") == pytest.approx(0.1)
    assert http2.parse_timeout("2S") == 2.0 and http2.parse_timeout("5u") == pytest.approx(5e-6)
    assert http2.parse_timeout("x") is None and http2.parse_timeout("12") is None


def test_split_field_leaves_the_rest_for_protobuf_and_views_the_raw_contents() -> None:
    # tritonclient's copy of the same messages: ours would clash with it in protobuf's default pool
    pb: Any = pytest.importorskip("tritonclient.grpc.service_pb2")
    req = pb.ModelInferRequest(model_name="m", model_version="2", id="r1")
    req.inputs.add(name="a", datatype="FP32", shape=[1, 3])
    req.inputs.add(name="b", datatype="INT64", shape=[1])
    req.parameters["k"].string_param = "v"
    req.outputs.add(name="out")
    raws = [os.urandom(12), b"", os.urandom(300)]
    req.raw_input_contents.extend(raws)
    wire = bytearray(req.SerializeToString())
    rest, found = split_field(memoryview(wire), RAW_INPUT_CONTENTS)
    assert [bytes(f) for f in found] == raws
    assert all(not f.readonly for f in found)  # views of our own buffer: tensors need no copy
    back = pb.ModelInferRequest.FromString(rest)
    assert not back.raw_input_contents
    back.raw_input_contents.extend(raws)
    assert back == req
    with pytest.raises((ValueError, IndexError)):
        split_field(memoryview(wire)[:-5], RAW_INPUT_CONTENTS)  # truncated
    # where the first raw input starts, from the first bytes received (the fields before it come first)
    at = bytes(wire).index(raws[0])
    assert field_start(memoryview(wire), RAW_INPUT_CONTENTS) == at
    assert field_start(memoryview(wire)[: at + 1], RAW_INPUT_CONTENTS) == at
    assert field_start(memoryview(wire)[: at - 3], RAW_INPUT_CONTENTS) is None  # key or length not in yet
    assert field_start(memoryview(rest), RAW_INPUT_CONTENTS) is None
    assert field_start(memoryview(b"\xff\xff"), RAW_INPUT_CONTENTS) is None  # not a message


class RawClient:
    """HTTP/2 frames by hand, for what grpcio never sends: split header blocks, padding, a deadline the
    client does not enforce itself."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        from hpack import Decoder, Encoder

        self.r, self.w, self.enc, self.dec = r, w, Encoder(), Decoder()
        w.write(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))

    def call(
        self,
        sid: int,
        path: str,
        message: bytes,
        *,
        timeout: str | None = None,
        data: bool = True,
        encoding: str | None = None,
        compressed: bool = False,
    ) -> None:
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x")]
        headers += [("content-type", "application/grpc"), ("te", "trailers")]
        headers += [("grpc-timeout", timeout)] if timeout else []
        headers += [("grpc-encoding", encoding)] if encoding else []
        block = self.enc.encode(headers)
        half = len(block) // 2  # HEADERS + CONTINUATION
        self.w.write(http2.frame(http2.HEADERS, 0, sid, block[:half]))
        self.w.write(http2.frame(http2.CONTINUATION, http2.END_HEADERS, sid, block[half:]))
        if not data:
            return
        body = bytes((int(compressed),)) + len(message).to_bytes(4, "big") + message
        padded = bytes((3,)) + body + b"\x00\x00\x00"  # PADDED: pad length, data, padding
        self.w.write(http2.frame(http2.DATA, http2.PADDED | http2.END_STREAM, sid, padded))

    async def frames(self) -> tuple[int, int, int, bytes]:
        head = await self.r.readexactly(9)
        n = int.from_bytes(head[:3], "big")
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, await self.r.readexactly(n)

    async def answer(self, sid: int) -> tuple[dict[str, str], bytes]:
        """Headers and trailers of stream `sid` merged, and its DATA (answering PINGs meanwhile)."""
        headers: dict[str, str] = {}
        data = b""
        while True:
            kind, flags, s, payload = await self.frames()
            if kind == http2.HEADERS and s == sid:
                headers.update((str(k), str(v)) for k, v in self.dec.decode(payload))
                if flags & http2.END_STREAM:
                    return headers, data
            elif kind == http2.DATA and s == sid:
                data += payload


def test_compressed_messages_gzip_cannot_read_end_their_call_naming_the_problem() -> None:
    """What grpcio never sends: an encoding other than gzip and deflate (UNIMPLEMENTED, telling the ones we
    take in grpc-accept-encoding), the compressed flag with grpc-encoding identity, a corrupt gzip message
    (INTERNAL); a raw client's gzip message is answered."""
    import gzip

    async def scenario(target: str, server: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        c.call(1, "/t.E/Echo", b"packed", encoding="zstd", compressed=True)
        headers, _ = await c.answer(1)
        assert headers["grpc-status"] == str(http2.UNIMPLEMENTED)
        assert "encoded as 'zstd': send gzip, deflate or identity" in unquote(headers["grpc-message"])
        assert headers["grpc-accept-encoding"] == "identity,deflate,gzip"
        c.call(3, "/t.E/Echo", b"packed", compressed=True)
        headers, _ = await c.answer(3)
        assert headers["grpc-status"] == str(http2.INTERNAL)
        assert "flagged compressed while grpc-encoding is identity" in unquote(headers["grpc-message"])
        c.call(5, "/t.E/Echo", b"not gzip", encoding="gzip", compressed=True)
        headers, _ = await c.answer(5)
        assert headers["grpc-status"] == str(http2.INTERNAL)
        assert "request message is not valid gzip data" in unquote(headers["grpc-message"])
        c.call(7, "/t.E/Echo", gzip.compress(b"hello"), encoding="gzip", compressed=True)
        headers, data = await c.answer(7)
        assert headers["grpc-status"] == "0" and data == b"\x00\x00\x00\x00\x05olleh"
        assert server.budget.held == 0
        c.w.close()

    _serve(Echo(), scenario)


def test_split_header_blocks_padding_ping_and_a_server_side_deadline() -> None:
    async def scenario(target: str, _: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        c.call(1, "/t.E/Echo", b"hello")
        headers, data = await c.answer(1)
        assert headers[":status"] == "200" and headers["grpc-status"] == "0"
        assert data == b"\x00\x00\x00\x00\x05olleh"
        c.w.write(http2.frame(http2.PING, 0, 0, b"12345678"))
        while (f := await c.frames())[0] != http2.PING:
            pass
        assert f[1] == http2.ACK and f[3] == b"12345678"
        # a DATA frame in pieces, each its own read: the frame header split, then the payload in three
        c.call(3, "/t.E/Echo", b"", data=False)
        message = os.urandom(3000)
        wire = http2.frame(
            http2.DATA, http2.END_STREAM, 3, b"\x00" + len(message).to_bytes(4, "big") + message
        )
        for a, b in ((0, 4), (4, 12), (12, 1000), (1000, 2000), (2000, len(wire))):
            c.w.write(wire[a:b])
            await c.w.drain()
            await asyncio.sleep(0.02)
        headers, data = await c.answer(3)
        assert (
            headers["grpc-status"] == "0"
            and data == b"\x00" + len(message).to_bytes(4, "big") + message[::-1]
        )
        c.call(5, "/t.E/Slow", b"x", timeout="200m")  # this client would wait forever: the server ends it
        headers, data = await asyncio.wait_for(c.answer(5), 5)
        assert headers["grpc-status"] == "4" and data == b""
        c.w.close()

    app = Echo()

    async def slow(message: memoryview) -> bytes:
        await asyncio.sleep(30)
        return b""

    _serve(app.handlers() | {"/t.E/Slow": slow}, scenario, timeout=30)


def test_a_ping_answer_rides_with_the_answer_of_an_open_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpc-go and grpcio send a PING as each response reaches them: while a call is open its answer carries
    the PING's answer (first in that write), so no write of its own; ACK_DELAY bounds the wait."""
    monkeypatch.setattr(http2, "ACK_DELAY", 30.0)
    gate = asyncio.Event()

    async def gated(message: memoryview) -> bytes:
        await gate.wait()
        return b"ok"

    async def never(message: memoryview) -> bytes:
        await asyncio.sleep(60)
        return b""

    async def upto(c: RawClient, seconds: float) -> list[tuple[int, int, int, bytes]]:
        got = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(await asyncio.wait_for(c.frames(), seconds))
        return got

    async def scenario(target: str, _: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        assert await upto(c, 0.3)  # SETTINGS both ways (a PING now would ride with the SETTINGS ACK)
        c.call(1, "/t.E/Gated", b"x")
        c.w.write(http2.frame(http2.PING, 0, 0, b"pingpong"))
        assert await upto(c, 0.3) == []  # its answer waits for the call's
        gate.set()
        kinds = []
        while (f := await c.frames())[:3] != (http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1):
            kinds.append((f[0], f[2]) if f[0] != http2.PING else (f[0], f[3]))
        assert kinds[:3] == [(http2.PING, b"pingpong"), (http2.HEADERS, 1), (http2.DATA, 1)]
        # with no call open the answer goes at once; with one open that does not end, after ACK_DELAY
        c.w.write(http2.frame(http2.PING, 0, 0, b"idle...."))
        assert (await asyncio.wait_for(c.frames(), 5))[::3] == (http2.PING, b"idle....")
        c.w.close()
        monkeypatch.setattr(http2, "ACK_DELAY", 0.05)
        c = RawClient(*await asyncio.open_connection(host, int(port)))  # its timer: 0.05 s
        assert await upto(c, 0.3)
        c.call(1, "/t.E/Never", b"x")
        c.w.write(http2.frame(http2.PING, 0, 0, b"waiting."))
        assert (await asyncio.wait_for(c.frames(), 5))[::3] == (http2.PING, b"waiting.")
        c.w.close()

    _serve({"/t.E/Gated": gated, "/t.E/Never": never}, scenario, timeout=30)


def test_a_client_that_floods_pings_and_reads_nothing_is_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    """A PING flood (CVE-2019-9512): every PING is owed an answer, and a client that sends them without
    reading ours would make the server hold them all. Past MAX_PAUSED_ACKS owed while its transport is over
    the high-water mark, the server ends the connection, and drops it as the client reads nothing; other
    clients are served on."""
    caplog.set_level("INFO", logger=http2.__name__)

    async def scenario(target: str, server: GrpcServer) -> None:
        host, port = target.split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for us
        sock.connect((host, int(port)))
        _, w = await asyncio.open_connection(sock=sock)
        w.write(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))
        pings = http2.frame(http2.PING, 0, 0, b"flooding") * 4096
        sent, limit = 0, 64 << 20  # answered in full, that is 64 MiB to hold: the cut comes well before
        with contextlib.suppress(ConnectionError):
            while sent < limit:
                w.write(pings)
                await w.drain()
                sent += len(pings)
        assert sent < limit, sent
        w.close()
        assert await until(lambda: not server.connections, 5.0)  # the server lets go of the connection
        assert any("PING or SETTINGS" in getattr(r, "reason", "") for r in caplog.records)
        async with _channel(target) as ch:
            assert await ch.unary_unary("/t.E/Echo")(b"abc") == b"cba"

    _serve(Echo(), scenario, timeout=60)


def test_quiet_connections_close_unless_a_call_is_being_answered() -> None:
    """Nothing received for keepalive_s: a client stalled in the middle of a request (its bytes so far held
    for it) is closed with GOAWAY, and so is one whose answer waits for a window the client never opens,
    and an idle one, whose client reconnects for its next call; a connection whose call is being answered
    stays, however long the answer takes."""

    async def scenario(target: str, server: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        c.call(1, "/t.E/Echo", b"", data=False)
        c.w.write(http2.frame(http2.DATA, 0, 1, b"\x00" + (1 << 20).to_bytes(4, "big") + b"x" * 100))
        blocked = RawClient(*await asyncio.open_connection(host, int(port)))
        blocked.call(1, "/t.E/Echo", bytes(100_000))  # its answer: more than the 64 KiB window it opens
        async with _channel(target) as ch:
            assert await ch.unary_unary("/t.E/Slow")(b"") == b"late"  # 2 s of no bytes, being answered
            assert len(server.connections) == 1  # the grpcio channel's: the quiet ones closed meanwhile
            for raw in (c, blocked):
                while (f := await asyncio.wait_for(raw.frames(), 5))[0] != http2.GOAWAY:
                    pass
                assert int.from_bytes(f[3][4:8], "big") == http2.NO_ERROR and b"nothing received" in f[3][8:]
                assert await raw.r.read() == b""  # then closed
            await asyncio.sleep(2.0)  # idle past keepalive_s: closed too
            assert not server.connections
            assert await ch.unary_unary("/t.E/Echo")(b"again") == b"niaga"  # on a new connection

    _serve(Echo().handlers() | {"/t.E/Slow": _late(2.0)}, scenario, keepalive_s=0.5)


def test_a_connection_is_quiet_from_its_last_answer_on_not_from_its_last_read() -> None:
    """A call answered after more than keepalive_s leaves its connection open for keepalive_s more (as
    HTTP/1.1 counts): a client that sent nothing while waiting must not lose the connection it is about to
    send its next call on."""

    async def scenario(target: str, server: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        c.call(1, "/t.E/Slow", b"")
        headers, data = await c.answer(1)  # a raw client: nothing sent while it waits, nor after
        assert headers["grpc-status"] == "0" and data.endswith(b"late")
        assert len(server.connections) == 1
        assert not server._stale(time.monotonic() - server.keepalive_s)  # not quiet for 1 s: answered now
        assert await until(lambda: not server.connections, 3.0)  # quiet from here on: then closed

    _serve({"/t.E/Slow": _late(1.0)}, scenario, keepalive_s=0.5)


def test_calls_started_and_cancelled_at_once_past_the_burst_end_the_connection() -> None:
    """A rapid reset (CVE-2023-44487): each call costs the server work, the client waits for none. Past
    RESET_BURST cancelled calls (then RESET_RATE per second) the connection ends with GOAWAY
    ENHANCE_YOUR_CALM; a client that cancels a few calls, and other connections, go on."""

    async def scenario(target: str, server: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        for i in range(10):  # a few cancelled calls: nothing happens
            c.call(2 * i + 1, "/t.E/Echo", b"x")
            c.w.write(http2.frame(http2.RST_STREAM, 0, 2 * i + 1, http2.CANCEL.to_bytes(4, "big")))
        c.call(21, "/t.E/Echo", b"ok")
        headers, data = await asyncio.wait_for(c.answer(21), 10)
        assert headers["grpc-status"] == "0" and data.endswith(b"ko")
        for i in range(11, 11 + 2 * http2.RESET_BURST):
            c.call(2 * i + 1, "/t.E/Echo", b"x")
            c.w.write(http2.frame(http2.RST_STREAM, 0, 2 * i + 1, http2.CANCEL.to_bytes(4, "big")))
        while (f := await asyncio.wait_for(c.frames(), 10))[0] != http2.GOAWAY:
            pass
        assert int.from_bytes(f[3][4:8], "big") == http2.ENHANCE_YOUR_CALM and b"cancelled" in f[3][8:]
        async with _channel(target) as ch:
            assert await ch.unary_unary("/t.E/Echo")(b"abc") == b"cba"

    _serve(Echo(delay=0.5), scenario, timeout=60)


def test_index_only_header_blocks_are_decoded_once_until_the_table_changes() -> None:
    """A block of indexed fields only is decoded once per connection; a block that adds to the dynamic table
    shifts every index, so the same bytes then mean other headers: a remembered decoding must go. Checked
    against a reference decoder fed the same blocks, and end to end: the repeated bytes that meant a call to
    Echo mean a call to Fail once ':path /t.E/Fail' entered the table."""
    from hpack import Decoder, Encoder

    enc, ref = Encoder(), Decoder()
    conn = http2._Connection(GrpcServer({}, max_message=1 << 20))
    base = [(":method", "POST"), (":scheme", "http"), (":authority", "x")]
    grpc = ("content-type", "application/grpc")
    echo, fail = [*base, (":path", "/t.E/Echo"), grpc], [*base, (":path", "/t.E/Fail"), grpc]
    first, again = enc.encode(echo), enc.encode(echo)
    assert min(again) >= 0x80 and min(first) < 0x80  # literals, then indexes only
    blocks = [first, again, again, enc.encode(fail), again]
    got = [conn._decode(b) for b in blocks]
    want = [http2.malformed(f := ref.decode(b), False) or dict(f) for b in blocks]  # type: ignore[arg-type]
    assert got == want
    assert isinstance(got[2], dict) and got[2][":path"] == "/t.E/Echo"
    # the same bytes now point at other entries: content-type, then ':path /t.E/Fail' after it
    assert got[4] == "pseudo-header :path after a regular field"
    assert conn.decoded == {}  # forgotten when the table changed; a malformed block is not remembered

    async def scenario(target: str, _: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))

        def call(sid: int, block: bytes) -> None:
            c.w.write(http2.frame(http2.HEADERS, http2.END_HEADERS, sid, block))
            c.w.write(http2.frame(http2.DATA, http2.END_STREAM, sid, b"\x00\x00\x00\x00\x02ab"))

        for sid, block in zip((1, 3, 5, 7), blocks, strict=False):
            call(sid, block)
            headers, data = await c.answer(sid)
            want = "5" if sid == 7 else "0"
            assert headers["grpc-status"] == want, (sid, headers)
            assert data == (b"" if want == "5" else b"\x00\x00\x00\x00\x02ba")
        call(9, blocks[4])  # not served as the remembered Echo call: refused as malformed
        while (frame := await c.frames())[0] != http2.RST_STREAM:
            pass
        assert frame[2] == 9 and int.from_bytes(frame[3], "big") == http2.PROTOCOL_ERROR
        c.w.close()

    _serve(Echo(), scenario)


class Buffers:
    """A protocol.http2 buffer factory that records what it made and counts the releases."""

    def __init__(self) -> None:
        self.made: list[tuple[int, int]] = []  # (size, bytes seen when asked)
        self.released = 0

    def __call__(self, size: int, seen: memoryview) -> Any:
        self.made.append((size, len(seen)))
        outer = self

        class Held:
            view = memoryview(bytearray(size))

            def release(self) -> None:
                outer.released += 1

        return Held()


def test_each_message_lands_in_one_buffer_of_its_size_released_once_however_its_call_ends() -> None:
    bufs = Buffers()
    app = Echo()

    held_at_cancel: list[int] = []

    async def slow(message: memoryview) -> bytes:
        app.started.set()
        try:
            await asyncio.sleep(30)
        finally:  # its message is still ours until we return: not released yet
            held_at_cancel.append(bufs.released)
        return b""

    async def released(n: int) -> None:
        while bufs.released < n:  # noqa: ASYNC110 (released in the call's task, after its answer is out)
            await asyncio.sleep(0.01)

    async def scenario(target: str, _: GrpcServer) -> None:
        payload = os.urandom(1 << 20)
        async with _channel(target) as ch:
            assert await ch.unary_unary("/t.E/Echo")(payload) == payload[::-1]
            assert bufs.made == [(5 + len(payload), bufs.made[0][1])] and bufs.made[0][1] >= 5
            app.started.clear()  # (the echo above set it)
            pending = ch.unary_unary("/t.E/Slow")(b"abandoned")
            await asyncio.wait_for(app.started.wait(), 5)
            pending.cancel()  # RST_STREAM while the handler holds the message
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/t.E/Echo")(b"q" * (2 << 20))  # refused from its prefix: no buffer
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.wait_for(released(2), 5)
            assert len(bufs.made) == 2 and held_at_cancel == [1]
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        # the length prefix split over two DATA frames
        c.call(1, "/t.E/Echo", b"", data=False)
        c.w.write(http2.frame(http2.DATA, 0, 1, b"\x00\x00"))
        c.w.write(http2.frame(http2.DATA, http2.END_STREAM, 1, b"\x00\x00\x03abc"))
        headers, data = await c.answer(1)
        assert headers["grpc-status"] == "0" and data == b"\x00\x00\x00\x00\x03cba"
        # more bytes than the prefix announced: one message per unary call
        c.call(3, "/t.E/Echo", b"", data=False)
        c.w.write(http2.frame(http2.DATA, http2.END_STREAM, 3, b"\x00\x00\x00\x00\x01ab"))
        headers, _ = await c.answer(3)
        assert headers["grpc-status"] == str(http2.INTERNAL) and "exactly one" in headers["grpc-message"]
        # the client leaves with a message half sent
        c.call(5, "/t.E/Echo", b"", data=False)
        c.w.write(http2.frame(http2.DATA, 0, 5, b"\x00\x00\x00\x10\x00half"))
        await c.w.drain()
        await asyncio.wait_for(released(4), 5)
        assert len(bufs.made) == 5 and bufs.made[-1] == (5 + 0x1000, 9)
        c.w.close()
        await asyncio.wait_for(released(5), 5)
        await asyncio.sleep(0.1)
        assert bufs.released == len(bufs.made) == 5  # each once

    handlers = app.handlers() | {"/t.E/Slow": slow}
    _serve(handlers, scenario, max_message=(2 << 20) - 1, buffers={"/t.E/Echo": bufs, "/t.E/Slow": bufs})


def _stream_handlers(cancelled: asyncio.Event) -> dict[str, http2.Handler]:
    """/t.E/Stream answers each message reversed; one starting with b"slow" after 0.3 s; b"boom" ends the
    call with a status; b"hang" waits until cancelled."""

    async def each(message: memoryview) -> bytes:
        data = bytes(message)
        if data.startswith(b"slow"):
            await asyncio.sleep(0.3)
        if data == b"boom":
            raise RpcError(9, "boom refused")
        if data == b"hang":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return data[::-1]

    return {"/t.E/Stream": each}


def test_a_streaming_call_answers_each_message_as_it_is_done_and_ends_ok() -> None:
    """Bidirectional streaming (Triton's ModelStreamInfer is one) with grpcio's client: every request message
    gets its answer on the same call, a quick one before a slow one sent earlier; several messages in flight
    at once; the call ends OK once the client is done and every answer is out."""
    cancelled = asyncio.Event()

    async def scenario(target: str, server: GrpcServer) -> None:
        async with _channel(target) as ch:
            call = ch.stream_stream("/t.E/Stream")()
            await call.write(b"slow one")
            for i in range(5):
                await call.write(f"quick {i}".encode())
            big = os.urandom(3 << 20)  # past the windows, in many frames
            await call.write(big)
            await call.done_writing()
            answers = [bytes(a) async for a in call]
            assert await call.code() == grpc.StatusCode.OK
        assert sorted(answers) == sorted(
            [b"eno wols", *(f"quick {i}".encode()[::-1] for i in range(5)), big[::-1]]
        )
        assert answers[-1] == b"eno wols"  # answered last though sent first
        assert server.budget.held == 0  # every message's bytes given back

    _serve(_stream_handlers(cancelled), scenario, stream_handlers=_stream_handlers(cancelled))


def test_streaming_calls_by_hand_messages_packed_split_none_cut_short_failed_and_reset() -> None:
    cancelled = asyncio.Event()

    def message(data: bytes) -> bytes:
        return b"\x00" + len(data).to_bytes(4, "big") + data

    async def scenario(target: str, server: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        # two whole messages in one DATA frame, a third split over two frames, then the end
        c.call(1, "/t.E/Stream", b"", data=False)
        c.w.write(http2.frame(http2.DATA, 0, 1, message(b"ab") + message(b"cd") + message(b"efgh")[:4]))
        await c.w.drain()
        await asyncio.sleep(0.05)
        c.w.write(http2.frame(http2.DATA, http2.END_STREAM, 1, message(b"efgh")[4:]))
        headers, data = await c.answer(1)
        assert headers[":status"] == "200" and headers["grpc-status"] == "0"
        assert sorted(data.split(b"\x00\x00\x00\x00")[1:]) == [b"\x02ba", b"\x02dc", b"\x04hgfe"]
        # no message at all: trailers-only OK
        c.call(3, "/t.E/Stream", b"", data=False)
        c.w.write(http2.frame(http2.DATA, http2.END_STREAM, 3, b""))
        headers, data = await c.answer(3)
        assert headers["grpc-status"] == "0" and data == b""
        # the client ends its side in the middle of a message
        c.call(5, "/t.E/Stream", b"", data=False)
        c.w.write(http2.frame(http2.DATA, http2.END_STREAM, 5, message(b"whole")[:6]))
        headers, _ = await c.answer(5)
        assert (
            headers["grpc-status"] == str(http2.INTERNAL) and "middle of a message" in headers["grpc-message"]
        )
        # a handler's status ends the call
        c.call(7, "/t.E/Stream", b"", data=False)
        c.w.write(http2.frame(http2.DATA, 0, 7, message(b"boom")))
        headers, _ = await c.answer(7)
        assert headers["grpc-status"] == "9" and headers["grpc-message"] == "boom refused"
        # the client resets the call: a message being answered is cancelled, its bytes given back
        c.call(9, "/t.E/Stream", b"", data=False)
        c.w.write(http2.frame(http2.DATA, 0, 9, message(b"hang")))
        await c.w.drain()
        await asyncio.sleep(0.1)
        c.w.write(http2.frame(http2.RST_STREAM, 0, 9, http2.CANCEL.to_bytes(4, "big")))
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert server.budget.held == 0
        c.w.close()

    _serve({}, scenario, stream_handlers=_stream_handlers(cancelled))


def test_protocol_errors_are_answered_as_rfc_9113_says_and_late_frames_of_a_reset_call_are_dropped() -> None:
    """By hand, what h2spec checks in full (tests/integration): a request that is not a gRPC call gets a
    plain 415 with a body; a malformed header block and DATA past content-length reset their stream only;
    DATA on a stream the client ended resets it (STREAM_CLOSED); DATA for a call the server reset before it
    heard is dropped; DATA on a stream never opened ends the connection (PROTOCOL_ERROR)."""

    async def scenario(target: str, _: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))

        def headers(sid: int, fields: list[tuple[str, str]], flags: int = http2.END_HEADERS) -> None:
            c.w.write(http2.frame(http2.HEADERS, flags, sid, c.enc.encode(fields)))

        async def until(kind: int) -> tuple[int, int, int, bytes]:
            while (f := await c.frames())[0] != kind:
                pass
            return f

        base = [(":method", "POST"), (":scheme", "http"), (":path", "/t.E/Echo"), (":authority", "x")]
        headers(1, [*base, ("content-type", "text/plain")], http2.END_HEADERS | http2.END_STREAM)
        _, flags, sid, block = await until(http2.HEADERS)  # a plain HTTP answer, its body ends the stream
        assert sid == 1 and not flags & http2.END_STREAM and dict(c.dec.decode(block))[":status"] == "415"
        _, flags, sid, data = await until(http2.DATA)
        assert sid == 1 and flags & http2.END_STREAM and b"speaks gRPC" in data
        headers(3, [("content-type", "application/grpc"), *base])  # a pseudo-header after a regular one
        _, _, sid, payload = await until(http2.RST_STREAM)
        assert sid == 3 and int.from_bytes(payload, "big") == http2.PROTOCOL_ERROR
        headers(5, [*base, ("content-type", "application/grpc"), ("content-length", "3")])
        c.w.write(http2.frame(http2.DATA, 0, 5, b"\x00\x00\x00\x00\x02ab"))  # 7 bytes, not 3
        _, _, sid, payload = await until(http2.RST_STREAM)
        assert sid == 5 and int.from_bytes(payload, "big") == http2.PROTOCOL_ERROR
        c.w.write(http2.frame(http2.DATA, http2.END_STREAM, 5, b"late"))  # reset by us: dropped
        c.call(7, "/t.E/Echo", b"ab")
        c.w.write(http2.frame(http2.DATA, 0, 7, b"more"))  # after its END_STREAM
        _, _, sid, payload = await until(http2.RST_STREAM)
        assert sid == 7 and int.from_bytes(payload, "big") == http2.STREAM_CLOSED
        c.call(9, "/t.E/Echo", b"ab")  # the connection goes on
        got, data = await c.answer(9)
        assert got["grpc-status"] == "0" and data == b"\x00\x00\x00\x00\x02ba"
        c.w.write(http2.frame(http2.DATA, 0, 11, b"x"))  # a stream never opened
        _, _, _, payload = await until(http2.GOAWAY)
        assert int.from_bytes(payload[4:8], "big") == http2.PROTOCOL_ERROR and b"not an opened one" in payload
        c.w.close()

    _serve(Echo(), scenario)


def test_a_message_in_many_small_data_frames_arrives_whole_and_its_windows_are_refilled() -> None:
    """A 9 MiB message in 16 KiB DATA frames (as grpc-go sends them; the receiving side's fast path), each
    read holding several frames and ending mid-frame: the echo is the message reversed, and past half of
    each 16 MiB window the server sent WINDOW_UPDATEs for the connection and the stream."""
    message = bytes(range(256)) * (9 << 12)  # 9 MiB

    async def scenario(target: str, _: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        c.call(1, "/t.E/Echo", b"", data=False)
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        step = 16384
        for i in range(0, len(body), step):
            last = i + step >= len(body)
            c.w.write(http2.frame(http2.DATA, http2.END_STREAM if last else 0, 1, body[i : i + step]))
        for sid in (0, 1):  # room for the 9 MiB echo
            c.w.write(http2.frame(http2.WINDOW_UPDATE, 0, sid, (16 << 20).to_bytes(4, "big")))
        await c.w.drain()
        updates: dict[int, int] = {}
        data = b""
        while True:
            kind, flags, sid, payload = await c.frames()
            if kind == http2.WINDOW_UPDATE:
                updates[sid] = updates.get(sid, 0) + int.from_bytes(payload, "big")
            elif kind == http2.DATA and sid == 1:
                data += payload
            elif kind == http2.HEADERS and sid == 1 and flags & http2.END_STREAM:
                break
        assert data[5:] == message[::-1]
        # the connection's first update is the window's growth at the start; then half-window refills
        assert updates[1] >= http2.WINDOW // 2 and updates[0] - (http2.WINDOW - http2.DEFAULT_WINDOW) >= (
            http2.WINDOW // 2
        ), updates
        c.w.close()

    _serve(Echo(), scenario)


def test_the_rest_of_a_large_data_frame_is_read_straight_into_its_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large DATA frames (as grpcio's C core sends them) written in pieces, so that reads end mid-frame: the
    rest of each frame is read into the call's message itself, not the read buffer, and the message still
    arrives whole (two frames, each begun in a read of its own) and is answered; with a content-length, the
    bytes read that way count against it (more DATA than it says resets the stream; the connection goes
    on)."""
    lent: list[int] = []
    buffer_updated = http2._Connection.buffer_updated

    def updated(self: http2._Connection, nbytes: int) -> None:
        if self.lent is not None:
            lent.append(nbytes)
        buffer_updated(self, nbytes)

    monkeypatch.setattr(http2._Connection, "buffer_updated", updated)
    message = os.urandom(600_000)
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    frames = [body[:400_000], body[400_000:]]

    async def send_in_pieces(c: RawClient, sid: int, frames: list[bytes], piece: int = 50_000) -> None:
        for n, payload in enumerate(frames):
            data = http2.frame(http2.DATA, http2.END_STREAM if n else 0, sid, payload)
            for i in range(0, len(data), piece):
                c.w.write(data[i : i + piece])
                await c.w.drain()
                await asyncio.sleep(0.005)  # each piece in a read of its own, mostly

    async def scenario(target: str, _: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        c.call(1, "/t.E/Echo", b"", data=False)
        for sid in (0, 1):  # room for the echo
            c.w.write(http2.frame(http2.WINDOW_UPDATE, 0, sid, (1 << 20).to_bytes(4, "big")))
        await send_in_pieces(c, 1, frames)
        headers, data = await c.answer(1)
        assert headers["grpc-status"] == "0" and data[5:] == message[::-1]
        # most of the message went straight in: all but the reads that began each frame (a piece, or more
        # on a busy machine) and the frames' last few bytes (a read's tail under LEND_MIN)
        assert len(lent) >= 2 and sum(lent) >= len(body) // 2, lent
        lent.clear()
        fields = [(":method", "POST"), (":scheme", "http"), (":path", "/t.E/Echo"), (":authority", "x")]
        fields += [("content-type", "application/grpc"), ("content-length", "300000")]
        c.w.write(http2.frame(http2.HEADERS, http2.END_HEADERS, 3, c.enc.encode(fields)))
        # one frame, no END_STREAM (nothing checks the total at the end): the bytes read straight into the
        # message count against the 300,000 announced
        await send_in_pieces(c, 3, [body[: 400_000 - 9]])

        async def reset() -> tuple[int, int, int, bytes]:
            while (f := await c.frames())[0] != http2.RST_STREAM:
                pass
            return f

        f = await asyncio.wait_for(reset(), 5)
        assert f[2] == 3 and int.from_bytes(f[3], "big") == http2.PROTOCOL_ERROR and lent
        c.call(5, "/t.E/Echo", b"ab")  # the connection goes on
        headers, data = await c.answer(5)
        assert headers["grpc-status"] == "0" and data == b"\x00\x00\x00\x00\x02ba"
        c.w.close()

    _serve(Echo(), scenario)


def test_a_call_reset_before_its_task_ran_gives_its_bytes_back_and_a_stream_ended_from_outside_stops() -> (
    None
):
    """Two leaks the fuzz test (test_serving_fuzz.py) found: a unary call whose request ends and is reset in
    the same read is cancelled before its task runs, so no `finally` in it could give its message's bytes
    back (they stayed held in the budget for good); and a streaming call ended by the server from outside its
    task (a message over the limit) left the task waiting for messages for ever."""
    cancelled = asyncio.Event()

    async def scenario(target: str, server: GrpcServer) -> None:
        host, port = target.split(":")
        c = RawClient(*await asyncio.open_connection(host, int(port)))
        c.call(1, "/t.E/Echo", b"x" * 100)  # HEADERS, DATA with END_STREAM ...
        c.w.write(http2.frame(http2.RST_STREAM, 0, 1, http2.CANCEL.to_bytes(4, "big")))  # ... reset at once
        await c.w.drain()
        c.call(3, "/t.E/Stream", b"", data=False)
        c.w.write(http2.frame(http2.DATA, 0, 3, b"\x00" + (1 << 30).to_bytes(4, "big")))  # 1 GiB: refused
        headers, _ = await c.answer(3)
        assert headers["grpc-status"] == str(http2.RESOURCE_EXHAUSTED)
        assert await until(lambda: server.budget.held == 0, 5), server.budget.held
        await asyncio.sleep(0.05)
        pending = [t for t in asyncio.all_tasks() if "_stream_call" in repr(t) and not t.done()]
        assert pending == []
        c.w.close()

    _serve(Echo().handlers(), scenario, stream_handlers=_stream_handlers(cancelled))
