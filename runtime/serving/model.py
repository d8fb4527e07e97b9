"""A model being served: its signature, batcher and the truth about how it was compiled."""

from __future__ import annotations

import asyncio
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.serving.batching import Answer, Batcher, settle
from runtime.serving.errors import NotFound, Unavailable
from runtime.serving.signature import Signature


@dataclass
class ServedModel:
    name: str
    version: str
    signature: Signature
    batcher: Batcher
    max_batch_size: int
    platform: str = "pytorch"
    info: dict[str, Any] = field(default_factory=dict)  # backend, mode, path, fallbacks, compile_seconds, ...
    ready: bool = False

    def check_version(self, version: str | None) -> None:
        if version is not None and version != self.version:
            raise NotFound(
                f"model {self.name!r} has no version {version!r}; serving version {self.version!r}"
            )

    def metadata(self) -> dict[str, Any]:
        """OIP model metadata, plus `parameters` telling how the model was compiled."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [s.to_json() for s in self.signature.inputs],
            "outputs": [s.to_json() for s in self.signature.outputs],
            "parameters": {"max_batch_size": self.max_batch_size, **self.info},
        }

    async def infer(
        self, inputs: list[torch.Tensor], rows: int, *, deadline: float = math.inf, priority: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """Run one request through the batcher; `deadline`, `priority`: its client's (batching.Pending)."""
        if not self.ready:
            self.batcher.withdraw()
            raise Unavailable(f"model {self.name!r} is not ready")
        return await self._run(inputs, rows, deadline, priority)

    async def _run(
        self, inputs: list[torch.Tensor], rows: int, deadline: float, priority: int
    ) -> tuple[torch.Tensor, ...]:
        """A ready model's request, to its batcher in this process."""
        return await _waker().run(self.batcher, inputs, rows, deadline, priority)


class _Waker:
    """The batcher's sink for one event loop: a batch's results reach the loop with one wake-up (asyncio's
    call_soon_threadsafe, what wrap_future uses per future, writes to the loop's self-pipe every time: a
    system call per request of a batch, each a chance for the batcher to queue for the GIL again)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._done: list[tuple[Any, tuple[torch.Tensor, ...] | BaseException]] = []
        self._scheduled = False
        # the batchers that got a request in this turn of the loop: each holds one announcement until the turn
        # ends, so that a batch does not form from its first requests. uvloop runs its loop without the GIL
        # and takes it for each callback, which lets the batcher's thread in between: MLP, 64 REST clients,
        # no protocol workers, 40 rows a batch without the hold, 51 with it (docs/benchmarks.md)
        self._held: list[Batcher] = []
        # requests whose task was cancelled (run): handed back before the task saw it, or awaited by the task
        self._gone: set[asyncio.Future[Any]] = set()
        self._released: dict[asyncio.Future[Any], asyncio.Future[None]] = {}

    async def run(
        self, batcher: Batcher, inputs: list[torch.Tensor], rows: int, deadline: float, priority: int = 0
    ) -> tuple[torch.Tensor, ...]:
        mine: asyncio.Future[tuple[torch.Tensor, ...]] = self._loop.create_future()
        if batcher not in self._held:  # the turn's first request: a batch forming waits for the turn's rest
            batcher.announce()
            self._held.append(batcher)
            if len(self._held) == 1:
                self._loop.call_soon(self._end_turn)
        pending = batcher.submit_to(
            self, mine, inputs, rows, announced=True, deadline=deadline, priority=priority
        )
        try:
            return await mine
        except asyncio.CancelledError:
            pending.cancelled = True  # its client left: dropped unless its batch runs already
            # The task ends once the batcher let go of the request (dropped it, or ran it): until then its
            # tensors are the batcher's, so the protocol layer keeps its body's bytes counted in its budget
            # (http1.Budget) and clients that leave cannot make the process hold more than that.
            if not mine.cancelled():  # its result came first: handed back already
                raise
            if mine in self._gone:  # handed back before the task saw its cancellation
                self._gone.discard(mine)
            else:
                released = self._released[mine] = self._loop.create_future()
                await released
            raise

    def _end_turn(self) -> None:
        """The loop turn whose requests were announced as one is over: the batches may form."""
        held, self._held = self._held, []
        for b in held:
            b.withdraw(notify=True)

    def deliver(self, answer: Answer) -> None:  # the batcher's threads
        results = answer.results()
        with self._lock:
            self._done += results
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # the event loop
        with self._lock:
            done, self._done, self._scheduled = self._done, [], False
        for fut in settle(done):  # cancelled: their tasks wait for this, or will learn it from _gone
            released = self._released.pop(fut, None)
            if released is None:
                self._gone.add(fut)
            elif not released.done():
                released.set_result(None)


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waker] = weakref.WeakKeyDictionary()


def _waker() -> _Waker:
    loop = asyncio.get_running_loop()
    w = _wakers.get(loop)
    if w is None:
        w = _wakers[loop] = _Waker(loop)
    return w


class Repository:
    """The models one server serves, by name."""

    def __init__(self, models: list[ServedModel]) -> None:
        self.models = {m.name: m for m in models}
        self.failed: str | None = None  # why the model failed to load, when it did

    def get(self, name: str, version: str | None = None) -> ServedModel:
        try:
            model = self.models[name]
        except KeyError:
            if self.failed:
                raise Unavailable(
                    f"this server serves no model: it failed to load ({self.failed}); fix the model or"
                    " --model-uri and restart the server"
                ) from None
            raise NotFound(f"model {name!r} not found; serving {sorted(self.models)}") from None
        model.check_version(version)
        return model

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self.models.values())
