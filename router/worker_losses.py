"""Which pools lost a worker that no new one has replaced yet: what ``/health`` calls degraded.

The router learns of a death from the request that was running on the worker
(Ray's actor error, or a stream gone silent). A loss is made good when a worker
of the same pool appears that was not live when the loss happened, which is
how Serve's replacement shows up (a new replica id); each newcomer makes good
one loss. A loss nobody replaces (the pool was scaled down meanwhile) is
forgotten after ``forget_after_s``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from router.index import WorkerInfo


@dataclass(frozen=True)
class Loss:
    pool: str
    worker_id: str
    at: float  # time.monotonic()
    others: frozenset[str]  # the pool's other live workers when it died

    def describe(self, now: float) -> str:
        return f"worker {self.worker_id} died {now - self.at:.1f} s ago; no replacement yet"


class WorkerLosses:
    def __init__(self, forget_after_s: float = 600.0, remembered: int = 1024):
        self._forget_after_s = forget_after_s
        self._remembered = remembered
        self._open: OrderedDict[str, Loss] = OrderedDict()  # worker id → its loss, oldest first
        self._known: OrderedDict[str, None] = OrderedDict()  # every worker seen die or credited as a replacement

    def record(self, pool: str, worker_id: str, live_in_pool: Iterable[str]) -> bool:
        """A worker died; false when it was recorded already (many requests see one death)."""
        if worker_id in self._known:
            return False
        self._remember(worker_id)
        others = frozenset(live_in_pool) - {worker_id}
        self._open[worker_id] = Loss(pool, worker_id, time.monotonic(), others)
        return True

    def unreplaced(self, live: Iterable[WorkerInfo]) -> list[Loss]:
        """The open losses, after crediting each newcomer in ``live`` against the oldest loss of its pool."""
        now = time.monotonic()
        live_by_pool: dict[str, set[str]] = {}
        for worker in live:
            live_by_pool.setdefault(worker.role, set()).add(worker.worker_id)
        for loss in list(self._open.values()):
            newcomers = live_by_pool.get(loss.pool, set()) - loss.others - self._known.keys()
            if newcomers:
                self._remember(min(newcomers))
                del self._open[loss.worker_id]
            elif now - loss.at > self._forget_after_s:
                del self._open[loss.worker_id]
        return list(self._open.values())

    def _remember(self, worker_id: str) -> None:
        self._known[worker_id] = None
        while len(self._known) > self._remembered:
            self._known.popitem(last=False)
