"""What protocol workers and the model process say to each other: framed messages over a Unix socket, and
one shared-memory arena per worker that carries input tensors without a copy through the socket.

A message is `<I length><B kind>` then its payload. Tensors travel as (dtype code, shape, bytes); an input
either lies in the worker's arena (slot offset, byte count) or follows the message header inline (requests
larger than a slot, or when every slot is taken). Outputs always travel inline: they are small next to
inputs for the models we serve, and it keeps the arena one-directional (the worker writes, the model
process reads, the slot is free again when the response arrives). A batch's answers for one worker are one
ROWS message (ids and row counts, then each output's rows back to back); RESP answers one request (errors,
and outputs that are not plain row slices of the batch).

The arena is anonymous shared memory (memfd) created by the model process and filled with posix_fallocate,
so missing memory fails at start-up instead of as a SIGBUS at the first request; the worker maps it through
/proc/<model process>/fd/<fd>, and the model process closes that descriptor as soon as the worker said hello,
so nothing is left behind whatever way the processes end. Not /dev/shm: a pod's is 64 MiB unless an emptyDir
of medium Memory is mounted there, room for 4 of 8 workers' slots. Where memfd cannot be had (not Linux, or
/proc/<pid>/fd not openable) the arena is a file in /dev/shm, unlinked at hello.
Its first 64 bytes are a header: [0] the number of requests the worker has started decoding and not yet
sent (the batcher waits for them, as it waits for announced requests in a single-process server).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import logging
import math
import mmap
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from runtime.serving.protocol import datatypes

log = logging.getLogger(__name__)

HEADER_BYTES = 64  # an arena's header: 8 int64 counters, each written by the worker alone
ANNOUNCED = 0  # requests the worker is decoding (the batcher may wait for them)
CLOSED = 1  # client connections dealt to the worker that have ended (hub.Hub deals by least connections)

# message kinds
HELLO = 1  # worker -> model process: <I worker index>
STATE = 2  # model process -> worker: JSON (server info, model metadata, ready)
REQ = 3  # worker -> model process: an inference request
RESP = 4  # model process -> worker: outputs or an error
METRICS_REQ = 5  # worker -> model process: <Q id>; somebody asked this worker for /metrics
METRICS_PULL = 6  # model process -> worker: <Q id>; send your own metrics
METRICS_TEXT = 7  # worker -> model process: <Q id> + text exposition
METRICS_RESP = 8  # model process -> worker: <Q id> + merged text exposition
STOP = 9  # model process -> worker: stop accepting, finish in-flight requests, exit
ROWS = 10  # model process -> worker: the outputs of several requests of one batch, rows back to back
CANCEL = 11  # worker -> model process: <Q id>; its client left: drop the request unless its batch runs
LOG_REQ = 12  # worker -> model process: <Q id> + JSON: the log settings to change (logs.py)
LOG_RESP = 13  # model process -> worker: <Q id> + JSON {"settings": ...} or {"error": ...}, after its STATE

_FRAME = struct.Struct("<IB")
# id, rows, n inputs, its client's deadline (batching.Pending; inf: none), its priority (0: the default), when
# the worker encoded it (both time.monotonic: one clock for every process of the host; sent_at reads the last
# field)
_REQ = struct.Struct("<QIBdId")
_TENSOR = struct.Struct("<BBBQQ")  # dtype code, ndim, in arena (1) or inline (0), offset, nbytes
_RESP = struct.Struct("<QB")  # id, 0 ok / 1 error
_ID = struct.Struct("<Q")
_ROWS = struct.Struct("<IBd")  # requests, outputs, when the model process encoded it (time.monotonic)
_ROW_META = struct.Struct("<BB")  # dtype code, dimensions per row

DTYPES: tuple[torch.dtype, ...] = (
    torch.bool,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)
_CODE = {d: i for i, d in enumerate(DTYPES)}


def frame(kind: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    return _FRAME.pack(len(payload) + 1, kind) + bytes(payload)


class FrameReader:
    """Cuts a byte stream into messages; each payload is a fresh bytearray (tensors may keep viewing it)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytearray]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytearray]] = []
        pos, end = 0, len(buf)
        while end - pos >= 5:
            length, kind = _FRAME.unpack_from(buf, pos)
            if end - pos - 4 < length:
                break
            out.append((kind, buf[pos + 5 : pos + 4 + length]))
            pos += 4 + length
        if pos:
            del buf[:pos]
        return out


def send_fd(sock: socket.socket, kind: bytes, fd: int) -> None:
    """Send the descriptor `fd` with the message `kind` over a Unix socket, never waiting: BlockingIOError
    when the socket has no room. (Python 3.11's socket.send_fds and recv_fds drop their flags argument,
    MSG_DONTWAIT included: they wait on a blocking socket whatever they are told.)"""
    sock.sendmsg(
        [kind], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], socket.MSG_DONTWAIT
    )


def recv_fd(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message of send_fd's and the descriptors it carries, never waiting (BlockingIOError when there is
    none); (b"", []) once the other end is closed."""
    fds = array.array("i")
    msg, ancdata, _, _ = sock.recvmsg(16, socket.CMSG_LEN(4 * fds.itemsize), socket.MSG_DONTWAIT)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def _tensor(code: int, shape: Sequence[int], raw: memoryview | bytes) -> torch.Tensor:
    return datatypes.tensor_view(raw, DTYPES[code], shape)


@dataclass
class Placed:
    """Where one input tensor travels: in the arena at `offset`, or inline (offset -1)."""

    tensor: torch.Tensor
    offset: int = -1


def _align(n: int) -> int:
    return (n + 63) // 64 * 64  # every tensor in a slot starts 64-byte aligned


def _pack_meta(t: torch.Tensor, offset: int = -1) -> bytes:
    """A tensor's header: dtype, shape, and where its bytes are (arena offset, or inline when -1)."""
    shape = t.shape  # attributes, not methods: torch methods release the GIL and queue to get it back
    return _TENSOR.pack(_CODE[t.dtype], len(shape), offset >= 0, max(offset, 0), t.nbytes) + struct.pack(
        f"<{len(shape)}q", *shape
    )


def _unpack_metas(
    payload: memoryview, pos: int, n: int
) -> tuple[list[tuple[int, tuple[int, ...], bool, int, int]], int]:
    """`n` tensor headers from `pos`: [(dtype code, shape, in arena, offset, nbytes)] and where they end."""
    metas = []
    for _ in range(n):
        code, ndim, in_arena, offset, nbytes = _TENSOR.unpack_from(payload, pos)
        pos += _TENSOR.size
        shape = struct.unpack_from(f"<{ndim}q", payload, pos)
        pos += 8 * ndim
        metas.append((code, shape, bool(in_arena), offset, nbytes))
    return metas, pos


def _tensors(
    metas: list[tuple[int, tuple[int, ...], bool, int, int]],
    payload: memoryview,
    pos: int,
    arena: memoryview | None,
) -> list[torch.Tensor]:
    """The tensors the headers describe: views into `arena` or into the inline bytes from `pos` (no copy)."""
    out = []
    for code, shape, in_arena, offset, nbytes in metas:
        if in_arena:
            assert arena is not None
            raw = arena[offset : offset + nbytes]
        else:
            raw = payload[pos : pos + nbytes]
            pos += nbytes
        out.append(_tensor(code, shape, raw))
    return out


def encode_request(
    rid: int, rows: int, inputs: Sequence[Placed], deadline: float = math.inf, priority: int = 0
) -> bytes:
    """`priority`: Triton's (past 2**32 - 1: that, which is past any level, so the default level too)."""
    head = _REQ.pack(rid, rows, len(inputs), deadline, min(priority, 0xFFFFFFFF), time.monotonic())
    parts: list[bytes | memoryview] = [head]
    parts += [_pack_meta(p.tensor, p.offset) for p in inputs]
    parts += [datatypes.tensor_buffer(p.tensor) for p in inputs if p.offset < 0]
    payload = b"".join(parts)
    return _FRAME.pack(len(payload) + 1, REQ) + payload


def decode_request(payload: memoryview, arena: memoryview) -> tuple[int, int, list[torch.Tensor], float, int]:
    """(id, rows, inputs, deadline, priority): arena inputs are views into `arena`, inline ones into `payload`
    (no copy)."""
    rid, rows, n, deadline, priority, _ = _REQ.unpack_from(payload, 0)
    metas, pos = _unpack_metas(payload, _REQ.size, n)
    return rid, rows, _tensors(metas, payload, pos, arena), deadline, priority


def sent_at(kind: int, payload: memoryview | bytes | bytearray) -> float:
    """When a REQ or ROWS message was encoded (time.monotonic: one clock for every process of the host)."""
    return float((_REQ if kind == REQ else _ROWS).unpack_from(payload, 0)[-1])


def encode_response(rid: int, outputs: Sequence[torch.Tensor]) -> bytes:
    parts: list[bytes | memoryview] = [_RESP.pack(rid, 0), bytes([len(outputs)])]
    parts += [_pack_meta(t) for t in outputs]
    parts += [datatypes.tensor_buffer(t) for t in outputs]
    payload = b"".join(parts)
    return _FRAME.pack(len(payload) + 1, RESP) + payload


def encode_error(rid: int, kind: str, message: str) -> bytes:
    k = kind.encode()
    return frame(RESP, _RESP.pack(rid, 1) + bytes([len(k)]) + k + message.encode())


def decode_response(payload: memoryview) -> tuple[int, list[torch.Tensor] | tuple[str, str]]:
    """(id, outputs) or (id, (error class name, message))."""
    rid, status = _RESP.unpack_from(payload, 0)
    pos = _RESP.size
    if status:
        k = payload[pos]
        kind = bytes(payload[pos + 1 : pos + 1 + k]).decode()
        return rid, (kind, bytes(payload[pos + 1 + k :]).decode())
    metas, pos = _unpack_metas(payload, pos + 1, payload[pos])
    return rid, _tensors(metas, payload, pos, None)


def encode_rows(
    ids: Sequence[int], offsets: Sequence[int], rows: Sequence[int], outputs: Sequence[torch.Tensor]
) -> bytes:
    """One message answering several requests of one batch: request i gets rows offsets[i] : offsets[i] +
    rows[i] of every output. Per output its rows travel back to back in request order (one slice of the
    batch when the requests are consecutive in it, one numpy concatenation otherwise): no per-request
    headers or tensors to build on the model process's side."""
    n = len(ids)
    head: list[bytes] = [_ROWS.pack(n, len(outputs), time.monotonic())]
    for o in outputs:
        dims = o.shape[1:]
        head.append(_ROW_META.pack(_CODE[o.dtype], len(dims)) + struct.pack(f"<{len(dims)}q", *dims))
    head.append(struct.pack(f"<{n}Q", *ids) + struct.pack(f"<{n}I", *rows))
    parts: list[bytes | memoryview] = [_padded(b"".join(head))]
    consecutive = all(offsets[i] + rows[i] == offsets[i + 1] for i in range(n - 1))
    for o in outputs:
        a = datatypes.tensor_array(o)
        if consecutive:
            mine = a[offsets[0] : offsets[-1] + rows[-1]]
        else:
            mine = np.concatenate([a[x : x + r] for x, r in zip(offsets, rows, strict=True)])
        raw = datatypes.array_buffer(mine)
        parts += [raw, bytes(_align(len(raw)) - len(raw))]
    payload = b"".join(parts)
    return _FRAME.pack(len(payload) + 1, ROWS) + payload


def decode_rows(payload: memoryview) -> list[tuple[int, list[torch.Tensor]]]:
    """[(id, outputs)] from an encode_rows message; the tensors view `payload` (no copy)."""
    n, n_out, _ = _ROWS.unpack_from(payload, 0)
    pos = _ROWS.size
    metas = []
    for _ in range(n_out):
        code, ndim = _ROW_META.unpack_from(payload, pos)
        pos += _ROW_META.size
        metas.append((code, struct.unpack_from(f"<{ndim}q", payload, pos)))
        pos += 8 * ndim
    ids = struct.unpack_from(f"<{n}Q", payload, pos)
    rows = struct.unpack_from(f"<{n}I", payload, pos + 8 * n)
    pos = _align(pos + 12 * n)
    total = sum(rows)
    per_output = []
    for code, dims in metas:
        nbytes = total * DTYPES[code].itemsize * math.prod(dims)
        a = np.frombuffer(payload[pos : pos + nbytes], dtype=datatypes.numpy_of(DTYPES[code]))
        per_output.append((code, a.reshape((total, *dims))))
        pos += _align(nbytes)
    out = []
    offset = 0
    for rid, r in zip(ids, rows, strict=True):
        out.append((rid, [_from_array(a[offset : offset + r], code) for code, a in per_output]))
        offset += r
    return out


def _from_array(a: np.ndarray, code: int) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if DTYPES[code] == torch.bfloat16 else t


def _padded(b: bytes) -> bytes:
    return b + bytes(_align(len(b)) - len(b))


def pack_id(i: int, rest: bytes = b"") -> bytes:
    return _ID.pack(i) + rest


def unpack_id(payload: memoryview) -> tuple[int, bytes]:
    return _ID.unpack_from(payload, 0)[0], bytes(payload[_ID.size :])


class Arena:
    """A worker's shared-memory input arena: a header, then `slots` slots of `slot_bytes` each."""

    def __init__(self, path: str, slots: int, slot_bytes: int, *, create: bool, memfd: int = -1) -> None:
        """Map the arena at `path` (a file, or /proc/<pid>/fd/<n> of a memfd); `create` makes the file
        first, or, with `memfd`, fills that descriptor, kept open until forget_path."""
        self.path = path
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._memfd = memfd
        size = HEADER_BYTES + slots * slot_bytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create and memfd < 0 else 0)
        fd = os.open(path, flags, 0o600) if memfd < 0 else memfd
        try:
            if create:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError:
                    self.forget_path()
                    raise
            self._mm: mmap.mmap | None = mmap.mmap(fd, size)
        finally:
            if memfd < 0:
                os.close(fd)
        self.buf = memoryview(self._mm)
        self.size = size
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        self.counters = np.frombuffer(self._mm, dtype=np.int64, count=HEADER_BYTES // 8)
        self._free = list(range(slots - 1, -1, -1))

    @classmethod
    def anonymous(cls, name: str, slots: int, slot_bytes: int) -> Arena:
        """A new arena in a memfd, for another process of this user to map through `path`."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        path = f"/proc/{os.getpid()}/fd/{fd}"
        try:
            os.close(os.open(path, os.O_RDWR))  # what the worker will do: refused under some hardening
        except OSError:
            os.close(fd)
            raise
        return cls(path, slots, slot_bytes, create=True, memfd=fd)

    def forget_path(self) -> None:
        """Once every process has mapped it: close the memfd's descriptor, or unlink the file."""
        if self._memfd >= 0:
            fd, self._memfd = self._memfd, -1
            os.close(fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Unmap, now or (while tensors still view it) as soon as the last of them is gone."""
        if self._memfd >= 0:
            self.forget_path()
        mm, self._mm = self._mm, None
        if mm is None:
            return
        self.counters = np.zeros(HEADER_BYTES // 8, dtype=np.int64)  # drop our numpy view of the header
        try:
            self.buf.release()
            mm.close()
        except BufferError:
            pass  # views remain: the mapping goes with the last of them

    # worker side: slot bookkeeping (one event loop, no lock)
    def take(self, nbytes: int) -> int | None:
        """A free slot's byte offset for `nbytes`, or None (too large, or all taken: send inline)."""
        if nbytes > self.slot_bytes or not self._free:
            return None
        return HEADER_BYTES + self._free.pop() * self.slot_bytes

    def give(self, offset: int) -> None:
        """Put a taken slot back. A slot not out (given back twice: a bug) is logged and left alone, so it is
        never lent to two requests at once."""
        i = (offset - HEADER_BYTES) // self.slot_bytes
        if i in self._free:  # a scan of at most `slots` (64 per worker) entries
            log.error("a shared-memory slot was given back twice; ignored", extra={"slot": i})
            return
        self._free.append(i)

    def place(self, tensors: Sequence[torch.Tensor], offset: int | None) -> list[Placed]:
        """Copy `tensors` one after another into the slot at `offset` (None: all inline)."""
        if offset is None:
            return [Placed(t) for t in tensors]
        placed = []
        pos = offset
        for t in tensors:
            raw = datatypes.tensor_buffer(t)
            n = len(raw)
            self.buf[pos : pos + n] = raw
            placed.append(Placed(t, pos))
            pos += _align(n)
        return placed

    @staticmethod
    def slot_need(tensors: Sequence[torch.Tensor]) -> int:
        return sum(_align(t.numel() * t.element_size()) for t in tensors)
