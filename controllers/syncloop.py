"""Debounced, level-triggered syncs: the scheduling the TrainingJob and InferenceService controllers share.

Every event about an object (its own, its children's) asks for one `sync(key)` of it; a burst of events for
one object collapses into one sync, run DEBOUNCE_SECONDS later in kopf's executor (settings.execution: its
max_workers threads, not asyncio's default pool of cpu_count + 4). A sync that fails on the API is retried
2 s later; any other exception is logged and never takes the operator down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from controllers.kube import KubeError

Key = tuple[str, str]


class _Quiet(logging.Filter):
    def __init__(self, routine: frozenset[str]) -> None:
        super().__init__()
        self.routine = routine

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.routine


def quiet_handlers(*handlers: str, timers: tuple[str, ...] = ()) -> None:
    """kopf logs every successful handler run at INFO: for watch handlers that run on every event of every
    object and child, that is thousands of lines a minute that tell nothing."""
    routine = {f"Handler {h!r} succeeded." for h in handlers} | {f"Timer {t!r} succeeded." for t in timers}
    logging.getLogger("kopf.objects").addFilter(_Quiet(frozenset(routine)))


DEBOUNCE_SECONDS = 0.05
RETRY_SECONDS = 2.0


def first(store: Iterable[Any] | None) -> Any:
    """The one object a kopf index holds under a key (None: none)."""
    return next(iter(store or ()), None)


class SyncLoop:
    """The syncs of one kind, and the kopf indexes they read (`indexes`: their names). kopf hands the indexes
    to every handler as keyword arguments; `schedule` keeps them in `live` (they are live views), where a
    sync, running outside any handler, reads them."""

    def __init__(self, sync: Callable[[Key], None], log: logging.Logger, indexes: tuple[str, ...]) -> None:
        self._sync = sync
        self._log = log
        self._indexes = indexes
        self.live: dict[str, Any] = {}
        self._pending: dict[Key, asyncio.Task[None]] = {}
        self._executor: concurrent.futures.Executor | None = None

    def reset(self, executor: concurrent.futures.Executor | None) -> None:
        """Forget an earlier run's state (tests run the operator several times in one process)."""
        self._pending.clear()
        self.live.clear()
        self._executor = executor

    def store(self, index: str, key: Any) -> Any:
        """What index `index` holds under `key` (None: nothing, or the index not seen yet)."""
        held = self.live.get(index)
        return None if held is None else held.get(key)

    def schedule(self, key: Key, handler_kwargs: Mapping[str, Any] | None = None) -> None:
        """Sync `key` soon (call from the event loop, with the handler's keyword arguments when there are)."""
        for index in self._indexes:
            if handler_kwargs is not None and index in handler_kwargs:
                self.live[index] = handler_kwargs[index]
        task = self._pending.get(key)
        if task is not None and not task.done():
            return
        self._pending[key] = asyncio.get_running_loop().create_task(self._debounced(key))

    def _start(self, key: Key) -> None:
        # Only now does a new event need another sync: the ones that came while this one waited for a
        # thread are in the indexes it is about to read.
        self._pending.pop(key, None)
        self._sync(key)

    async def _debounced(self, key: Key) -> None:
        await asyncio.sleep(DEBOUNCE_SECONDS)
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._start, key)
        except KubeError as e:
            self._log.warning("sync of %s/%s failed (%s); retrying", *key, e)
            await asyncio.sleep(RETRY_SECONDS)
            self.schedule(key)
        except Exception:  # never let one object take the operator down
            self._log.exception("sync of %s/%s failed unexpectedly", *key)
