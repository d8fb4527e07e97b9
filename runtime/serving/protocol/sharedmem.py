"""Triton's system shared memory extension (REST `v2/systemsharedmemory/...`, gRPC `SystemSharedMemory*`):
a client on the same host (a sidecar, a pre-processing container of the pod) puts input tensors in a POSIX
shared memory object, registers it under a name, and names it in a request instead of sending the bytes;
outputs can be asked for in a region too. tritonclient's `utils.shared_memory` and its
`register_system_shared_memory` / `set_shared_memory` work unchanged.

Off unless the server is started with `--allow-client-shm` (Triton's own flag and default): a client that
may register regions may read and write any shared memory object the server's user can open.

Decisions:
- The registry is a directory of small files, one per region (key, offset, byte size), which every process
  of the server shares (the model process and its protocol workers). A registration is visible to every
  worker once its answer is sent, whichever worker a later request reaches; a name is taken atomically
  (a hard link fails when it exists). Each process keeps the objects it has opened, checked against the
  registry file's identity on every use (one stat): a region unregistered, or registered again, is opened
  anew, never served from an old descriptor.
- Reads and writes go through the object's descriptor (pread / pwrite), not a mapping: a client that
  truncates its object under the server gets a short read, answered 400, not a SIGBUS. An input costs one
  copy: with protocol workers, a request's first input of 64 KiB or more is read straight into a worker's
  shared-memory slot and travels to the model process where it lies (others into memory of their own, then
  into a slot, as any input); its bytes count against the per-request limit (--max-payload-mb, 413) and
  the process's in-flight budget (--max-inflight-mb, 429) until its answer.
- CUDA shared memory (cudaIPC handles) is not supported: registering one is answered 501 / UNIMPLEMENTED.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import stat
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import torch

from runtime.serving.errors import AlreadyExists, BadRequest, NotFound, PayloadTooLarge, QueueFull
from runtime.serving.protocol import datatypes

KEY_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory objects (shm_open's names)
MAX_REGIONS = 1024
OWN_PREFIX = "kubeforge"  # the server's own objects (protocol workers' arenas where memfd is missing)
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
NOT_ALLOWED = (
    "this server does not take client shared memory: start it with --allow-client-shm (a client that may "
    "register regions may read and write any shared memory object of the server's user), or send the "
    "tensor in the request"
)
CUDA_REFUSED = (
    "CUDA shared memory is not supported by this server: register system shared memory instead "
    "(tritonclient.utils.shared_memory; the server started with --allow-client-shm), or send the tensor in "
    "the request"
)


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


@dataclass(frozen=True)
class Target:
    """Where a request puts one output: a region, an offset into it and the room there."""

    region: str
    offset: int
    byte_size: int


class Reads:
    """What one request's inputs read from shared memory hold until its answer (SharedMemory.release)."""

    __slots__ = ("nbytes", "protocol", "slot")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol  # rest or grpc: the budget's refusals are counted by protocol
        self.nbytes = 0  # taken from the budget
        self.slot: Any = None  # a protocol worker's slot an input was read into (http1.Body)


class _Opened:
    __slots__ = ("fd", "ident", "region")

    def __init__(self, region: Region, fd: int, ident: tuple[int, int, int]) -> None:
        self.region = region
        self.fd = fd
        self.ident = ident


def create_registry() -> str:
    """A fresh registry directory for a server's processes (the server removes it: `remove_registry`)."""
    where = KEY_DIR if os.path.isdir(KEY_DIR) else None  # writable in a pod whose root file system is not
    return tempfile.mkdtemp(prefix=f"{OWN_PREFIX}-shm-registry-", dir=where)


def remove_registry(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class SharedMemory:
    """The regions registered with the server (the `registry` directory, shared by its processes: see
    create_registry) and this process's open descriptors."""

    def __init__(
        self,
        registry: str,
        *,
        key_dir: str = KEY_DIR,
        max_payload: int = 64 << 20,
        budget: Any = None,  # protocol.http1.Budget: input bytes held until each request's answer
        # a protocol worker's slot for an input of n bytes (http1.Body), or None (too small, or none free)
        lend: Callable[[int], Any] | None = None,
    ) -> None:
        self.registry = registry
        self.key_dir = key_dir
        self.max_payload = max_payload
        self.budget = budget
        self.lend = lend
        self._open: dict[str, _Opened] = {}

    def close(self) -> None:
        """Close this process's descriptors (the registry stays: the server removes it)."""
        for o in self._open.values():
            os.close(o.fd)
        self._open.clear()

    # -- the registry --
    def _file(self, name: str) -> str:
        if not name:
            raise BadRequest("a shared memory region needs a name")
        quoted = urllib.parse.quote(name, safe="")
        if len(quoted) > 200:
            raise BadRequest(f"shared memory region name of {len(name)} characters: at most ~200 allowed")
        return os.path.join(self.registry, "r-" + quoted)

    def _object(self, key: str) -> str:
        """The path of the shared memory object `key` (shm_open's name: '/name' or 'name')."""
        name = key[1:] if key.startswith("/") else key
        if not name or "/" in name or name in (".", "..") or "\0" in name or len(name) > 255:
            raise BadRequest(
                f"shared memory key {key!r} is not the name of a POSIX shared memory object ('/name', as "
                "passed to shm_open: no other '/')"
            )
        if name.startswith(OWN_PREFIX):
            raise BadRequest(f"shared memory key {key!r} names one of the server's own objects")
        return os.path.join(self.key_dir, name)

    def _open_object(self, region: Region) -> int:
        """A descriptor of the region's object, checked to hold the region; BadRequest naming what is
        wrong."""
        try:
            fd = os.open(self._object(region.key), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise BadRequest(
                f"shared memory region {region.name!r}: no shared memory object {region.key!r} (create it "
                "first, as tritonclient.utils.shared_memory.create_shared_memory_region does)"
            ) from None
        except OSError as e:
            raise BadRequest(
                f"shared memory region {region.name!r}: cannot open object {region.key!r}: {e.strerror}"
            ) from None
        size = os.fstat(fd)
        if not stat.S_ISREG(size.st_mode) or size.st_size < region.offset + region.byte_size:
            os.close(fd)
            raise BadRequest(
                f"shared memory region {region.name!r}: object {region.key!r} holds {size.st_size} bytes; "
                f"the region needs {region.offset + region.byte_size} (offset {region.offset} + byte_size "
                f"{region.byte_size})"
            )
        return fd

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        path = self._file(name)
        region = Region(name, key, offset, byte_size)
        os.close(self._open_object(region))  # refused now, not at the first request, when it cannot serve
        if len(os.listdir(self.registry)) >= MAX_REGIONS:
            raise BadRequest(f"{MAX_REGIONS} shared memory regions are registered: unregister some first")
        fd, tmp = tempfile.mkstemp(dir=self.registry, prefix=".new-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps({"key": key, "offset": offset, "byte_size": byte_size}))
            os.link(tmp, path)  # atomic: fails when the name is taken
        except FileExistsError:
            raise AlreadyExists(
                f"shared memory region {name!r} is already registered: unregister it first, or use another "
                "name"
            ) from None
        finally:
            os.unlink(tmp)

    def unregister(self, name: str = "") -> None:
        """Unregister one region (a name not registered: nothing to do, as Triton answers) or every one."""
        names = [name] if name else [r.name for r in self.status()]
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(n))
            self._forget(n)

    def status(self, name: str = "") -> list[Region]:
        """The registered regions (one, by name; NotFound when it is not registered)."""
        if name:
            region = self._read(name)
            if region is None:
                raise NotFound(f"shared memory region {name!r} is not registered")
            return [region]
        out = []
        for f in sorted(os.listdir(self.registry)):
            if f.startswith("r-"):
                region = self._read(urllib.parse.unquote(f[2:]))
                if region is not None:
                    out.append(region)
        return out

    def _read(self, name: str) -> Region | None:
        try:
            with open(self._file(name), "rb") as f:
                d = orjson.loads(f.read())
        except FileNotFoundError:
            return None
        return Region(name, d["key"], d["offset"], d["byte_size"])

    # -- use --
    def _forget(self, name: str) -> None:
        o = self._open.pop(name, None)
        if o is not None:
            os.close(o.fd)

    def _ident(self, name: str) -> tuple[int, int, int] | None:
        """The identity of `name`'s registry file (None: not registered): a region registered again has
        another."""
        try:
            st = os.stat(self._file(name))
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns

    def _get(self, name: str) -> _Opened:
        """The region `name` as registered now, its object open."""
        ident = self._ident(name)
        if ident is None:
            self._forget(name)
            raise BadRequest(
                f"shared memory region {name!r} is not registered (register it first: POST "
                f"v2/systemsharedmemory/region/{name}/register, or tritonclient's "
                "register_system_shared_memory)"
            )
        o = self._open.get(name)
        if o is not None and o.ident == ident:
            return o
        self._sweep()  # a miss: let go of regions unregistered since (their objects stay pinned while open)
        region = self._read(name)
        if region is None:
            raise BadRequest(f"shared memory region {name!r} is not registered")
        o = _Opened(region, self._open_object(region), ident)
        self._open[name] = o
        return o

    def _sweep(self) -> None:
        for name, o in list(self._open.items()):
            if self._ident(name) != o.ident:
                self._forget(name)

    def _span(self, o: _Opened, t: Target, n: int, where: str) -> int:
        """The object offset of `n` bytes at t.offset in its region, checked to lie inside it."""
        r = o.region
        if t.offset + n > r.byte_size:
            raise BadRequest(
                f"{where}: {n} bytes at offset {t.offset} run past the end of shared memory region "
                f"{r.name!r} ({r.byte_size} bytes)"
            )
        return r.offset + t.offset

    def read(
        self, t: Target, dt: datatypes.DataType, shape: list[int], where: str, reads: Reads
    ) -> torch.Tensor:
        """An input tensor read from its region (BadRequest naming the problem): into a protocol worker's
        shared-memory slot when it lends one (the first large input of a request: it travels to the model
        process where it lies), else into memory of its own. Its bytes are taken from the budget and added
        to `reads`: `release` it once the request is answered."""
        need = math.prod(shape) * dt.itemsize
        if t.byte_size != need:
            raise BadRequest(
                f"{where}: {BYTE_SIZE} is {t.byte_size}, but shape {shape} of {dt.name} needs {need} bytes"
            )
        if need > self.max_payload:
            raise PayloadTooLarge(
                f"{where}: {need} bytes in shared memory, more than the server's --max-payload-mb "
                f"({self.max_payload} bytes)"
            )
        o = self._get(t.region)
        at = self._span(o, t, need, where)
        if self.budget is not None and not self.budget.take(need, reads.protocol):
            raise QueueFull(self.budget.refusal(need))
        reads.nbytes += need
        buf: bytearray | memoryview | None = None
        if self.lend is not None and reads.slot is None:
            reads.slot = self.lend(need)
            buf = reads.slot.view if reads.slot is not None else None
        if buf is None:
            buf = bytearray(need)
        why = ""
        try:
            got = os.preadv(o.fd, [buf], at) if need else 0
        except OSError as e:
            got, why = -1, str(e.strerror)
        if got != need:
            raise BadRequest(
                f"{where}: could not read {need} bytes of shared memory region {t.region!r} "
                f"({why if got < 0 else f'object ends after {got}'}): was it truncated?"
            )
        return datatypes.tensor_view(buf, dt.torch, shape)

    def release(self, reads: Reads) -> None:
        """Give back what a request's shared memory inputs held: their bytes in the budget, and the slot."""
        if self.budget is not None and reads.nbytes:
            self.budget.give(reads.nbytes)
        reads.nbytes = 0
        if reads.slot is not None:
            reads.slot.release()
            reads.slot = None

    def write(self, t: Target, data: memoryview, where: str) -> None:
        """An output's bytes into its region (BadRequest when they do not fit)."""
        n = len(data)
        if n > t.byte_size:
            raise BadRequest(f"{where}: the output is {n} bytes, more than its {BYTE_SIZE} of {t.byte_size}")
        o = self._get(t.region)
        at = self._span(o, t, n, where)
        done = 0
        while done < n:
            done += os.pwrite(o.fd, data[done:], at + done)
