"""Rank 0 keeps the process group's store to 127.0.0.1 on one machine, and only there."""

from __future__ import annotations

import socket

import pytest

from runtime.training import job
from runtime.training.stores import loopback_store


@pytest.fixture(autouse=True)
def _no_held_store() -> None:
    job._held.clear()


def _env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rank_0_on_loopback_holds_a_store_that_listens_there(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    _env(monkeypatch, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0")
    job._hold_loopback_store()
    assert len(job._held) == 1 and job._held[0].port == port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # it listens
    job._held.clear()


@pytest.mark.parametrize(
    "values",
    [
        {"MASTER_ADDR": "10.0.0.7", "RANK": "0"},  # a cluster: other pods must reach rank 0's store
        {"MASTER_ADDR": "127.0.0.1", "RANK": "1"},  # only rank 0 hosts it
        {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"},  # the agent's
    ],
    ids=["cluster", "rank-1", "agent-store"],
)
def test_nothing_is_held_elsewhere(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    _env(monkeypatch, MASTER_PORT=str(_free_port()), **values)
    job._hold_loopback_store()
    assert job._held == []


def test_a_port_already_taken_leaves_it_to_torch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    taken = loopback_store()
    _env(monkeypatch, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(taken.port), RANK="0")
    job._hold_loopback_store()
    assert job._held == []
    assert "could not be kept to 127.0.0.1" in caplog.text
