"""A run on one machine (`kubeforge-train --local`) listens on 127.0.0.1 only: the elastic agent's rendezvous
store and rank 0's process-group store (torch's would listen on every address), and gloo."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import run_local, tiny_llama

pytestmark = pytest.mark.integration


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (the forked workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)  # in host order, 32 bits at a time
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_a_local_run_listens_on_loopback_only(tmp_path: Path) -> None:
    before = _listening(_tree(os.getpid()))
    seen: set[tuple[str, int]] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.update(_listening(_tree(os.getpid())) - before)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run = run_local(tmp_path, tiny_llama(tmp_path, optimizer={"steps": 5}), 2, "--no-checkpoint")
    finally:
        stop.set()
        sampler.join()
    assert run.code == 0
    assert len(seen) >= 2, seen  # the rendezvous store and rank 0's store at least
    assert all(_loopback(address) for address, _ in seen), sorted(seen)
