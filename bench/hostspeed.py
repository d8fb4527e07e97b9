"""How fast this host is at what bounds a protocol worker, in a quarter of a second: a line for each bench
table, at its start and its end, so that tables from different lent machines can be compared and a host
that slows down during a run shows it (the fourteenth session's H100 host gave the same run 11,580 and
then 6,843 rows/s within one call).

- Python: ns per iteration of a loop that does what the HTTP/2 frame loop does per frame (a struct unpack,
  a dict lookup, attribute reads and writes);
- copying: GB/s of 602 KB copies (a ResNet-50 image) into 256 MiB of memory in turn (more than a CPU's
  last-level cache), cold as a request's shared-memory slot is;
- waking up: µs of a round trip between two processes over a Unix socket pair, each asleep in `recv`
  between messages 0.5 ms apart (what a request's hops between a worker and the model process cost).

    python bench/hostspeed.py
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.cpus import cpus_allowed

_FRAME = struct.Struct(">HBBBI")


@dataclass(frozen=True)
class HostSpeed:
    python_ns: float  # per iteration of the frame-like loop (median of 5 runs)
    copy_gbps: float  # 602 KB copies into cold memory (median of 3 runs)
    wakeup_us: float  # p50 of a process round trip after 0.5 ms asleep
    cpus: float  # the CPUs this process may use (affinity, cgroup quota)
    cpu_model: str

    def line(self, when: str) -> str:
        return (
            f"host ({when}): Python {self.python_ns:.0f} ns per frame-like iteration, copies to cold memory "
            f"{self.copy_gbps:.1f} GB/s, a process round trip after 0.5 ms asleep {self.wakeup_us:.0f} µs "
            f"(p50); {self.cpus:g} CPUs allowed, {self.cpu_model}"
        )

    def short(self) -> str:
        return (
            f"Python {self.python_ns:.0f} ns, copies {self.copy_gbps:.1f} GB/s, "
            f"wake-up {self.wakeup_us:.0f} µs"
        )


class _Stream:
    __slots__ = ("filled", "unacked")

    def __init__(self) -> None:
        self.filled = self.unacked = 0


def _python_ns(iterations: int = 20_000) -> float:
    frame = _FRAME.pack(0, 16, 0, 0, 1) + bytes(16)
    streams = {1: _Stream()}
    t = time.perf_counter()
    for _ in range(iterations):
        hi, lo, _kind, flags, sid = _FRAME.unpack_from(frame, 0)
        s = streams.get(sid & 0x7FFFFFFF)
        if s is not None and not flags & 1:
            s.filled += hi << 8 | lo
            s.unacked += 1
    return (time.perf_counter() - t) / iterations * 1e9


def _copy_gbps(rounds: int = 100) -> float:
    row = np.ones(602_112, np.uint8)
    slots = np.zeros(256 << 20, np.uint8)
    slots[::4096] = 1  # its pages resident, as a slot's are
    per = len(slots) // len(row)
    t = time.perf_counter()
    for i in range(rounds):
        at = (i * 37 % per) * len(row)
        slots[at : at + len(row)] = row
    return rounds * len(row) / (time.perf_counter() - t) / 1e9


# the other process: echoes what it reads on the socket it inherits (a bare interpreter: nothing to import)
_ECHO = (
    "import socket, sys\ns = socket.socket(fileno=int(sys.argv[1]))\nwhile d := s.recv(64):\n    s.sendall(d)"
)


def _wakeup_us(rounds: int = 400) -> float:
    a, b = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", _ECHO, str(b.fileno())], pass_fds=(b.fileno(),))
    b.close()
    a.settimeout(10)  # a child that never came up fails the measurement instead of hanging it
    samples = []
    try:
        a.sendall(b"x")
        a.recv(64)  # the child is up
        for _ in range(rounds):
            time.sleep(0.0005)
            t = time.perf_counter()
            a.sendall(b"x")
            a.recv(64)
            samples.append(time.perf_counter() - t)
    finally:
        a.close()  # the child reads its end: it exits
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return statistics.median(samples) * 1e6


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def measure() -> HostSpeed:
    return HostSpeed(
        python_ns=statistics.median(_python_ns() for _ in range(5)),
        copy_gbps=statistics.median(_copy_gbps() for _ in range(3)),
        wakeup_us=_wakeup_us(),
        cpus=cpus_allowed(),
        cpu_model=_cpu_model(),
    )


if __name__ == "__main__":
    print(measure().line("now"))
