"""The model process's side of the protocol workers (runtime.serving.frontend): it reserves the ports, starts
the workers, feeds their requests to the batcher and sends the outputs back.

Per worker: a shared-memory arena (ipc.Arena) and a Unix-socket connection. Once the model is ready the
batcher thread reads every connection itself while it waits for requests (`Hub.pump`, the batcher's Source:
decode, submit, a few microseconds of Python per request); until then a reader thread does. A batch's
responses to a worker leave in one send, from the answering thread itself when the socket has room, else from
the writer thread. A worker whose client leaves sends a CANCEL: the request is dropped unless its batch was
launched. A worker that dies while the server is not stopping is started again; its in-flight requests are
lost with its connections, as they would be with the process.

With `--balance least-connections` (the default) a thread of its own, `hub-deal`, accepts the clients'
connections and deals each to the worker holding the fewest (SCM_RIGHTS over a Unix socket per worker; ties
go round the workers). With SO_REUSEPORT the kernel picks a worker by a hash of the client's address and
port, which does not look at the load: 64 connections over 8 workers leave the busiest with 12 (median of a
uniform hash) where 8 is the share, and gRPC clients open few connections (a channel is one): 16 over 8
workers leave one idle in 69 % of draws (docs/serving.md). A connection's requests stay with its worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import selectors
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from runtime.serving import ipc, pagelock
from runtime.serving.batching import Answer, Batcher, Pending
from runtime.serving.busypoll import Pace, poll_select
from runtime.serving.config import ServeConfig
from runtime.serving.errors import InferError, Unavailable
from runtime.serving.frontend import WorkerConfig, listen_socket, main
from runtime.serving.logs import vital_thread
from runtime.serving.metrics import Metrics, merge
from runtime.serving.server import DEALT_GRPC, DEALT_HTTP

log = logging.getLogger(__name__)
T = TypeVar("T")

_WAKE = object()  # the selector's key for the wake-up pipe
_FD_SETSIZE = 1024
SLOT_BYTES = 1 << 20  # one 224x224x3 FP32 image (602 KB) per slot, with room to spare
MAX_SLOTS = 64  # per worker: 64 requests in flight through shared memory, more travel inline
# a dead worker that cannot be started again (no processes, descriptors or memory left) is tried again after
# this long, doubling up to the most
RESPAWN_FIRST_S, RESPAWN_MAX_S = 0.5, 30.0


def take_turns(ready: list[T], turn: int, handle: Callable[[T], object], over: Callable[[], bool]) -> int:
    """Handle `ready`'s items from index `turn` (modulo its length) round to the start, until `over()` says
    the round is over (asked before each); returns the turn the next round starts at: just past the last
    handled, so that rounds cut short do not keep favouring the same connections."""
    n = len(ready)
    for i in range(n):
        if over():
            return (turn + i) % n
        handle(ready[(turn + i) % n])
    return (turn + 1) % n if n else turn


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def plan_slots(workers: int, room: int | None = None) -> int:
    """Slots per worker: at most MAX_SLOTS, and a quarter of `room` (default: memory_room()) over all
    workers."""
    room = memory_room() if room is None else room
    return max(0, min(MAX_SLOTS, int(room * 0.25 / max(1, workers) / SLOT_BYTES)))


def memory_room() -> int:
    """Bytes of memory this process may still take: the machine's MemAvailable, and within the cgroup's
    limit (cgroup v2 memory.max - memory.current) when there is one; arenas are memory (memfd) whatever
    /dev/shm's size."""
    room = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        meminfo = Path("/proc/meminfo").read_text()
        room = int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = min(room, int(limit) - used)
    return max(0, room)


class _Writer:
    """One thread sends every worker its responses: each wake-up sends each worker everything queued for it
    in one write. (A thread per worker made the threads wanting the GIL outnumber the batcher thread.)"""

    def __init__(self, failed: Callable[[BaseException], object] | None = None) -> None:
        self.cond = threading.Condition()
        self.dirty: dict[int, _Conn] = {}
        vital_thread(self._loop, "hub-write", failed)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.dirty:
                    self.cond.wait()
                conns, self.dirty = list(self.dirty.values()), {}
                batches = [(c, c.outbox) for c in conns]
                for c in conns:
                    c.outbox = []
                    c.sending = True
            for conn, items in batches:
                if not conn.closed:
                    with contextlib.suppress(OSError):  # the reading thread sees the connection end
                        conn.sock.sendall(items[0] if len(items) == 1 else b"".join(items))
            with self.cond:
                for conn, _ in batches:
                    conn.sending = False


@dataclass
class _Conn:
    index: int
    sock: socket.socket
    arena: ipc.Arena
    writer: _Writer
    outbox: list[bytes] = field(default_factory=list)
    closed: bool = False
    submitted: int = 0  # requests given to the batcher (by the thread reading the connections)
    answered: int = 0  # of those, answered (under `lock`, which is notified)
    lock: threading.Condition = field(default_factory=threading.Condition)
    sending: bool = False  # the writer thread is sending this connection's earlier messages
    queued: dict[int, Pending] = field(default_factory=dict)  # submitted, not answered yet, by request id
    dealt: socket.socket | None = None  # where client connections are dealt to the worker (least-connections)
    handed: int = 0  # client connections dealt to it (by the dealing thread alone)

    def clients(self) -> int:
        """Client connections it holds: those dealt to it less those that ended (a counter it keeps)."""
        return self.handed - int(self.arena.counters[ipc.CLOSED])

    def post(self, item: bytes) -> None:
        """Send `item` now if the socket takes all of it without waiting and nothing sent earlier is still
        queued (no thread hop, no wake-up of the writer: the finishing thread answers a batch's workers
        itself); otherwise the writer thread sends it after what is queued, so one stuck worker never
        blocks the thread that answers batches."""
        w = self.writer
        with w.cond:
            if not self.outbox and not self.sending and not self.closed:
                try:
                    sent = self.sock.send(item, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return  # the reading thread sees the connection end
                if sent == len(item):
                    return
                item = item[sent:]
            self.outbox.append(item)
            if id(self) not in w.dirty:
                w.dirty[id(self)] = self
                w.cond.notify()

    def deliver(self, answer: Answer) -> None:
        """The batcher's sink: this worker's requests of one batch, answered in one message."""
        if answer.sliced and answer.outputs is not None:
            msg = ipc.encode_rows(answer.tags, answer.offsets, answer.rows, answer.outputs)
        else:
            msg = b"".join([_encode_result(rid, r) for rid, r in answer.results()])
        queued = self.queued
        for rid in answer.tags:
            queued.pop(rid, None)
        with self.lock:
            self.answered += len(answer.tags)
            self.lock.notify_all()  # a dead worker's arena waits for its last answers
        self.post(msg)


class Hub:
    def __init__(
        self,
        *,
        workers: int,
        cfg: ServeConfig,
        batcher: Batcher,
        metrics: Metrics,
        state: Callable[[], dict[str, Any]],
        set_log: Callable[[object], dict[str, Any]] | None = None,
        failed: Callable[[BaseException], object] | None = None,
    ) -> None:
        """`set_log`: changes Triton's log settings (the server's; InferError when refused); `failed`: told
        (from that thread) when one of the hub's threads fails: a bug of ours, after which requests hang."""
        self.failed = failed
        self.n = workers
        self.set_log = set_log
        self.batcher = batcher
        self.metrics = metrics
        self._hop = metrics.hop_time.labels("to_model")
        self.state = state
        self.stopping = False
        self._dir = tempfile.mkdtemp(prefix="kubeforge-serve-")
        self._socket_path = os.path.join(self._dir, "hub.sock")
        # least-connections: listen on the ports here, and deal the connections (gRPC too unless grpc.aio
        # serves it: it takes no connection it did not accept); else hold the ports (bound, not listening)
        # so that port 0 means one port for every worker
        self.dealing = cfg.balance == "least-connections" and workers > 1
        deal_grpc = self.dealing and cfg.grpc_server == "native"
        self._holds = [
            listen_socket(cfg.host, cfg.http_port, listen=self.dealing),
            listen_socket(cfg.host, cfg.grpc_port, listen=deal_grpc),
        ]
        self._dealt = [(DEALT_HTTP, self._holds[0])] + ([(DEALT_GRPC, self._holds[1])] if deal_grpc else [])
        self._dealer: threading.Thread | None = None
        self._deal_wake_r, self._deal_wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._deal_next = 0  # where a tie goes: round the workers
        self._channels: dict[int, socket.socket] = {}  # our end of each worker's dealing socket
        # what the workers run with: the ports held (port 0 resolved)
        self.cfg = replace(
            cfg, http_port=self._holds[0].getsockname()[1], grpc_port=self._holds[1].getsockname()[1]
        )
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._socket_path)
        self._listener.listen(workers * 2)
        self._slots = plan_slots(workers)
        self._procs: dict[int, Any] = {}
        self._arenas: dict[int, ipc.Arena] = {}
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()
        self._hello = threading.Condition(self._lock)
        self._gathers: dict[int, tuple[dict[int, bytes], threading.Event]] = {}
        self._gather_ids = iter(range(1, 1 << 62))
        self._ctx = multiprocessing.get_context("spawn")
        self._writer = _Writer(failed)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel: selectors.BaseSelector = selectors.SelectSelector()
        self._sel = register(self._sel, self._wake_r, _WAKE)
        self._sel = register(self._sel, self._listener, None)
        self._handed = False  # the batcher thread reads the connections now (pump)
        self._woken = False  # wake() was called during this round
        self._turn = 0  # the ready connection a round starts with (see take_turns)
        self._reader: threading.Thread | None = None
        # the batcher thread's polling (busypoll): at light load (its last batch ran one request, requests
        # come MIN_GAP_S apart or more) and with no batch in flight, whose finishing thread would wait for the
        # GIL the polling holds between calls
        self._poll_s = (cfg.busy_poll_us or 0.0) / 1e6
        self._polled = metrics.busy_poll.labels("model").inc
        self._pace = Pace()  # of the workers' requests (polling at light load only)
        batcher.set_external_announced(self.announced)
        batcher.set_source(self)

    # -- life --
    def start(self) -> None:
        log.info(
            "protocol workers",
            extra={"workers": self.n, "shm_slots_per_worker": self._slots, "slot_bytes": SLOT_BYTES},
        )
        if self._slots < MAX_SLOTS:
            log.warning(
                "little free memory: fewer input slots per worker, the rest travel through the socket",
                extra={"shm_slots_per_worker": self._slots},
            )
        with self._lock:
            if not self._handed:
                self._reader = vital_thread(self._read, "hub-read", self.failed)
        for i in range(self.n):
            self._spawn(i)
        if self.dealing:
            self._dealer = vital_thread(self._deal_loop, "hub-deal", self.failed)

    def wait_started(self, timeout: float) -> None:
        """Until every worker listens and said hello (RuntimeError naming the missing ones otherwise)."""
        deadline = time.monotonic() + timeout
        with self._hello:
            while len(self._conns) < self.n:
                dead = [i for i, p in self._procs.items() if p.exitcode is not None and i not in self._conns]
                left = deadline - time.monotonic()
                if dead or left <= 0:
                    raise RuntimeError(
                        f"protocol workers {sorted(set(range(self.n)) - set(self._conns))} did not start"
                        f" (exit codes {[self._procs[i].exitcode for i in dead]})"
                    )
                self._hello.wait(min(left, 0.2))

    def _new_arena(self, name: str) -> ipc.Arena:
        """In a memfd (see runtime.serving.ipc); a file in /dev/shm where there is none; without slots when
        neither has the room."""
        try:
            return ipc.Arena.anonymous(name, self._slots, SLOT_BYTES)
        except (OSError, AttributeError) as e:  # AttributeError: no os.memfd_create on this platform
            log.info("no memfd for worker inputs; a file in shared memory instead", extra={"error": str(e)})
        path = os.path.join(shm_dir(), name)
        try:
            return ipc.Arena(path, self._slots, SLOT_BYTES, create=True)
        except OSError as e:
            why = {"error": str(e)}
            log.warning("no shared memory for worker inputs; all travel through the socket", extra=why)
            return ipc.Arena(path, 0, SLOT_BYTES, create=True)

    def _spawn(self, i: int) -> None:
        arena = self._new_arena(f"kubeforge-{os.getpid()}-{i}-{time.monotonic_ns()}")
        path = arena.path
        theirs = None
        if self.dealing:  # a datagram per connection, its descriptor attached; ours is there by its hello
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with self._lock:
                self._channels[i] = ours
        cfg = WorkerConfig(i, self._socket_path, path, arena.slots, SLOT_BYTES, self.cfg, dealt=theirs)
        p = self._ctx.Process(target=main, args=(cfg,), name=f"kubeforge-frontend-{i}", daemon=True)
        try:
            p.start()  # the worker inherits its end of the socket pair (spawn passes it as a descriptor)
        except BaseException:
            arena.close()
            with self._lock:
                mine = self._channels.pop(i) if theirs is not None else None
            for sock in (mine, theirs):
                if sock is not None:
                    sock.close()
            raise
        if theirs is not None:
            theirs.close()
        with self._lock:
            self._arenas[i] = arena
            self._procs[i] = p

    def stop(self) -> None:
        """Tell every worker to stop accepting and finish; wait for them (then kill what is left)."""
        with self._lock:
            self.stopping = True  # a worker still starting gets STOP with its hello
            conns = list(self._conns.values())
        if self._dealer is not None:  # no new connections (the kernel refuses them once the ports close)
            os.write(self._deal_wake_w, b"\0")
            self._dealer.join()
        for fd in (self._deal_wake_r, self._deal_wake_w):
            os.close(fd)
        for c in conns:
            c.post(ipc.frame(ipc.STOP))
        deadline = time.monotonic() + self.cfg.grace_s + 5
        for p in list(self._procs.values()):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                log.warning("protocol worker did not stop in time; killing it", extra={"pid": p.pid})
                p.kill()
                p.join(5)
        for c in conns:
            self._close(c)
        self._listener.close()
        for s in self._holds:
            s.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def push_state(self) -> None:
        msg = self._state_frame()
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            c.post(msg)

    def _state_frame(self) -> bytes:
        return ipc.frame(ipc.STATE, json.dumps(self.state(), default=str).encode())

    def announced(self) -> int:
        """Requests the workers are decoding right now (the batcher may wait for them)."""
        return int(sum(int(c.arena.counters[ipc.ANNOUNCED]) for c in list(self._conns.values())))

    # -- reading the workers' connections --
    def _read(self) -> None:
        """Until the model is ready a thread of its own reads every worker's connection (and accepts new
        ones); then the batcher thread takes over (`pump`)."""
        while not self._handed:
            self._select(None)

    def pump(self, timeout: float | None) -> None:
        """The batcher's Source: its thread reads the workers' requests and submits them itself while it
        waits for them, so a request is not handed from a reader thread to the batcher thread (a wake-up,
        and each thread waiting for the GIL the other holds). The first call stops the reader thread."""
        if not self._handed:
            with self._lock:
                self._handed = True
                reader = self._reader
            self.wake()
            if reader is not None:
                reader.join()
            log.info("the batcher thread reads the protocol workers' requests from now on")
        self._select(timeout, cut=True)

    def wake(self) -> None:
        self._woken = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _select(self, timeout: float | None, cut: bool = False) -> None:
        """One round: wait up to `timeout` for the connections, handle what came. With `cut` (the batcher
        thread's rounds) the round ends between two connections once `timeout` has passed or `wake` was
        called (a batch filled, or the device is free), and what it did not read waits in the sockets for
        the next, so that reading never holds a launch back by more than one connection's messages."""
        start = time.perf_counter()
        self._woken = False
        try:
            if cut and self._poll_s and timeout != 0 and self._light_load():
                ready = poll_select(self._sel, timeout, self._poll_s, self._polled)
            else:
                ready = self._sel.select(timeout)
        except (OSError, ValueError):  # select() refuses a descriptor closed meanwhile (stop, a lost worker)
            if not prune(self._sel):
                log.exception("waiting for the protocol workers failed")
                time.sleep(0.01 if timeout is None else min(timeout, 0.01))
            return
        conns = []
        for key, _ in ready:
            if key.data is _WAKE:
                self._woken = True
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            else:
                conns.append(key)
        ends = start + timeout if timeout else math.inf
        over = (lambda: self._woken or time.perf_counter() >= ends) if cut else (lambda: False)
        self._turn = take_turns(conns, self._turn, self._ready, over)

    def _light_load(self) -> bool:
        """busypoll: no batch in flight (its finishing thread would wait for the GIL polling holds), the last
        one ran one request, and the workers' requests come MIN_GAP_S apart or more."""
        b = self.batcher
        return not b.inflight and b.last_taken <= 1 and self._pace.light()

    def _ready(self, key: selectors.SelectorKey) -> None:
        if key.data is not None:
            self._receive(key.fileobj, key.data)  # type: ignore[arg-type]
            return
        try:
            sock, _ = self._listener.accept()
        except OSError:  # stopped
            self._sel.unregister(self._listener)
            return
        self._sel = register(self._sel, sock, [ipc.FrameReader(), None])

    def _receive(self, peer: socket.socket, state: list[Any]) -> None:
        try:
            data = peer.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(peer)
            if state[1] is not None:
                threading.Thread(target=self._lost, args=(state[1],), daemon=True).start()
            else:
                peer.close()
            return
        for kind, payload in state[0].feed(data):
            if kind == ipc.HELLO:
                state[1] = self._hello_from(peer, int.from_bytes(payload, "little"))
            elif state[1] is not None:
                self._handle(state[1], kind, payload)

    def _hello_from(self, sock: socket.socket, i: int) -> _Conn:
        with self._lock:
            arena = self._arenas[i]
        arena.forget_path()  # mapped by both processes now; nothing to leave behind
        _page_lock(arena)
        conn = _Conn(i, sock, arena, self._writer, dealt=self._channels.get(i))
        conn.post(self._state_frame())
        with self._hello:
            self._conns[i] = conn
            self._hello.notify_all()
            if self.stopping:
                conn.post(ipc.frame(ipc.STOP))
        return conn

    def _handle(self, conn: _Conn, kind: int, payload: bytearray) -> None:
        if kind == ipc.REQ:
            if self._poll_s:
                self._pace.arrived()
            self._hop.observe(time.monotonic() - ipc.sent_at(kind, payload))
            try:
                rid, rows, inputs, deadline, priority = ipc.decode_request(
                    memoryview(payload), conn.arena.buf
                )
            except Exception as e:  # a worker bug, not a client's: answer it rather than hang the client
                log.exception("undecodable request from a protocol worker")
                conn.post(ipc.encode_error(int.from_bytes(payload[:8], "little"), "ModelFailure", str(e)))
                return
            try:
                conn.queued[rid] = self.batcher.submit_to(
                    conn, rid, inputs, rows, deadline=deadline, priority=priority
                )
            except InferError as e:
                conn.post(ipc.encode_error(rid, type(e).__name__, e.message))
                return
            conn.submitted += 1
        elif kind == ipc.CANCEL:
            p = conn.queued.get(ipc.unpack_id(memoryview(payload))[0])
            if p is not None:
                p.cancelled = True  # dropped unless its batch is launched already
        elif kind == ipc.LOG_REQ:
            rid, body = ipc.unpack_id(memoryview(payload))
            try:
                if self.set_log is None:
                    raise Unavailable("log settings are not served here")
                reply: dict[str, Any] = {"settings": self.set_log(json.loads(body))}
            except InferError as e:
                reply = {"error": e.message, "kind": type(e).__name__}
            except ValueError as e:  # not JSON: a worker bug
                reply = {"error": f"log settings message: {e}", "kind": "ModelFailure"}
            conn.post(ipc.frame(ipc.LOG_RESP, ipc.pack_id(rid, json.dumps(reply).encode())))
        elif kind == ipc.METRICS_REQ:
            rid, _ = ipc.unpack_id(memoryview(payload))
            threading.Thread(target=self._gather_metrics, args=(conn, rid), daemon=True).start()
        elif kind == ipc.METRICS_TEXT:
            gid, text = ipc.unpack_id(memoryview(payload))
            with self._lock:
                g = self._gathers.get(gid)
            if g is not None:
                g[0][conn.index] = text
                if len(g[0]) >= len(self._conns):
                    g[1].set()

    def _gather_metrics(self, asker: _Conn, rid: int) -> None:
        got: dict[int, bytes] = {}
        done = threading.Event()
        with self._lock:
            gid = next(self._gather_ids)
            self._gathers[gid] = (got, done)
            conns = list(self._conns.values())
        for c in conns:
            c.post(ipc.frame(ipc.METRICS_PULL, ipc.pack_id(gid)))
        done.wait(2.0)
        with self._lock:
            self._gathers.pop(gid, None)
        text = merge([self.metrics.render(), *got.values()])
        asker.post(ipc.frame(ipc.METRICS_RESP, ipc.pack_id(rid, text)))

    def _lost(self, conn: _Conn) -> None:
        self._close(conn)
        with self._lock:
            if self._conns.get(conn.index) is conn:
                del self._conns[conn.index]
            p = self._procs.get(conn.index)
        if self.stopping:
            return
        if p is not None:
            p.join(5)
        log.error(
            "protocol worker exited; starting it again",
            extra={"worker": conn.index, "exitcode": None if p is None else p.exitcode},
        )
        delay = RESPAWN_FIRST_S
        while not self.stopping:
            try:
                self._spawn(conn.index)
                break
            except Exception as e:  # out of processes, descriptors or memory: the others serve meanwhile
                log.error(
                    "starting a protocol worker again failed; retrying",
                    extra={"worker": conn.index, "error": f"{type(e).__name__}: {e}", "retry_in_s": delay},
                )
                time.sleep(delay)
                delay = min(2 * delay, RESPAWN_MAX_S)
        self._release_arena(conn)

    def _release_arena(self, conn: _Conn) -> None:
        """Give a dead worker's arena back (page-locked memory and the mapping) once the batcher has answered
        every request whose inputs view it; until then a batch may still be copying from it."""
        with conn.lock:
            done = conn.lock.wait_for(lambda: conn.answered >= conn.submitted, self.cfg.grace_s + 60)
        if not done:
            log.warning(
                "a dead worker's requests never finished; keeping its arena", extra={"worker": conn.index}
            )
            return
        _page_unlock(conn.arena)
        conn.arena.close()
        log.info("released a dead worker's arena", extra={"worker": conn.index, "requests": conn.submitted})

    def _close(self, conn: _Conn) -> None:
        conn.closed = True
        for sock in (conn.sock, conn.dealt):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    # -- dealing client connections (least-connections) --
    def _deal_loop(self) -> None:
        sel = selectors.DefaultSelector()  # waits without a timeout: epoll's rounding costs nothing here
        for kind, listener in self._dealt:
            listener.setblocking(False)
            sel.register(listener, selectors.EVENT_READ, kind)
        sel.register(self._deal_wake_r, selectors.EVENT_READ, None)
        while True:
            for key, _ in sel.select():
                if key.data is None:  # stop
                    sel.close()
                    for _, listener in self._dealt:
                        listener.close()
                    return
                self._accept(key.fileobj, key.data)  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket, kind: bytes) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors (EMFILE, ENFILE) or memory: the backlog keeps the rest
                log.warning("accepting a client connection failed", extra={"error": str(e)})
                time.sleep(0.05)
                return
            with client:  # our copy of it: the worker's stays open
                self._deal(client, kind)

    def _deal(self, client: socket.socket, kind: bytes) -> None:
        """Hand `client` to the worker holding the fewest client connections (ties: round the workers);
        one that is starting again or not reading its dealing socket is passed over."""
        passed: set[int] = set()
        deadline = time.monotonic() + 5.0
        while True:
            with self._hello:
                ready = [
                    c for c in self._conns.values() if c.dealt and not c.closed and c.index not in passed
                ]
                if not ready:
                    if self.stopping or time.monotonic() > deadline or passed:
                        log.warning("no protocol worker took a client connection; closing it")
                        return
                    self._hello.wait(0.1)  # every worker is starting (again)
                    continue
            n, nxt = self.n, self._deal_next
            c = min(ready, key=lambda c: (c.clients(), (c.index - nxt) % n))
            assert c.dealt is not None  # as `ready` has it
            try:
                ipc.send_fd(c.dealt, kind, client.fileno())
            except OSError as e:
                log.warning(
                    "could not deal a connection to a protocol worker",
                    extra={"worker": c.index, "error": str(e)},
                )
                passed.add(c.index)
                continue
            c.handed += 1
            self._deal_next = c.index + 1
            return


def register(sel: selectors.BaseSelector, fileobj: Any, data: Any) -> selectors.BaseSelector:
    """Register `fileobj` for reading; the selector to use from now on. select() waits to the microsecond
    (epoll to the millisecond, rounding up: a batch's fill wait of 0.3 ms would become 1 ms), but only for
    descriptors below FD_SETSIZE; past that, the default selector takes every registration over."""
    fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
    if fd >= _FD_SETSIZE and isinstance(sel, selectors.SelectSelector):
        log.warning("descriptor beyond select()'s range: waits round up to 1 ms", extra={"fd": fd})
        old, sel = sel, selectors.DefaultSelector()
        for key in list(old.get_map().values()):
            sel.register(key.fileobj, key.events, key.data)
        old.close()
    sel.register(fileobj, selectors.EVENT_READ, data)
    return sel


def prune(sel: selectors.BaseSelector) -> bool:
    """Forget the sockets closed while registered (select() refuses them); whether there were any."""
    closed = [k.fileobj for k in sel.get_map().values() if isinstance(k.fileobj, socket.socket)]
    closed = [s for s in closed if s.fileno() < 0]
    for sock in closed:
        sel.unregister(sock)
    return bool(closed)


def _page_lock(arena: ipc.Arena) -> None:
    """Register the arena with CUDA (page-locked): inputs then go to the GPU by DMA straight from it."""
    if arena.slots:
        pagelock.register(arena.address, arena.size)


def _page_unlock(arena: ipc.Arena) -> None:
    if arena.slots and not arena.closed:
        pagelock.unregister(arena.address)


def _encode_result(rid: int, r: BaseException | tuple[Any, ...]) -> bytes:
    if not isinstance(r, BaseException):
        return ipc.encode_response(rid, r)
    if isinstance(r, InferError):
        return ipc.encode_error(rid, type(r).__name__, r.message)
    return ipc.encode_error(rid, "ModelFailure", f"{type(r).__name__}: {r}")
