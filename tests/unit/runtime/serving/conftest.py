"""Fixtures of the serving unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest


@pytest.fixture(params=["asyncio", "uvloop"])
def each_event_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test on asyncio's event loop, then on uvloop's (`--event-loop`): the loops the tests start with
    asyncio.run follow the policy set here."""
    if request.param == "uvloop":
        import uvloop  # a dependency of the serving extra: missing, the test fails rather than skips

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield str(request.param)
    finally:
        asyncio.set_event_loop_policy(None)
