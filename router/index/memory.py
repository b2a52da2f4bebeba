"""In-memory prefix index: the embedded default for a single router replica."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from engine.cache_events import AllCleared, BlocksRemoved, BlocksStored, CacheEvent
from router.index.base import Claim, IndexHealth, InFlight, WorkerInfo


@dataclass(frozen=True)
class _Flight:
    expiry: float
    placed_at: float
    tokens: int
    kv_tokens: int


class MemoryPrefixIndex:
    network_io = False

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._holders: dict[bytes, set[str]] = {}
        self._held: dict[str, set[bytes]] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._expires: dict[str, float] = {}
        self._epochs: dict[str, int] = {}
        self._beats: dict[str, float] = {}  # worker → time of its last heartbeat
        self._flights: dict[str, dict[str, _Flight]] = {}  # worker → request → its claim

    def apply_events(self, worker_id: str, epoch: int, events: Sequence[CacheEvent]) -> None:
        with self._lock:
            if not self._advance_epoch(worker_id, epoch):
                return
            held = self._held.setdefault(worker_id, set())
            for event in events:
                if isinstance(event, BlocksStored):
                    for digest in event.hashes:
                        self._holders.setdefault(digest, set()).add(worker_id)
                    held.update(event.hashes)
                elif isinstance(event, BlocksRemoved):
                    for digest in event.hashes:
                        self._drop(worker_id, digest)
                    held.difference_update(event.hashes)
                elif isinstance(event, AllCleared):
                    self._drop_all(worker_id)
                    held = self._held.setdefault(worker_id, set())

    def heartbeat(self, worker: WorkerInfo, ttl_s: float) -> bool:
        with self._lock:
            known = self._epochs.get(worker.worker_id) == worker.epoch
            if not self._advance_epoch(worker.worker_id, worker.epoch):
                return True  # an older incarnation still beating: it has nothing to re-send
            now = self._clock()
            self._workers[worker.worker_id] = worker
            self._expires[worker.worker_id] = now + ttl_s
            self._beats[worker.worker_id] = now
            return known

    def match(self, chain: Sequence[bytes]) -> tuple[list[WorkerInfo], dict[str, int]]:
        with self._lock:
            live = self._live()
            counts = dict.fromkeys((w.worker_id for w in live), 0)
            active = set(counts)
            for depth, digest in enumerate(chain, start=1):
                active &= self._holders.get(digest, set())
                if not active:
                    break
                for worker_id in active:
                    counts[worker_id] = depth
            return live, counts

    def reserve(self, claims: Sequence[Claim], ttl_s: float) -> None:
        now = self._clock()
        with self._lock:
            for claim in claims:
                flights = self._flights.setdefault(claim.worker_id, {})
                known = flights.get(claim.request_id)
                placed_at = known.placed_at if known else now  # a renewal keeps its placing time
                flights[claim.request_id] = _Flight(now + ttl_s, placed_at, claim.tokens, claim.kv_tokens)

    def release(self, claims: Sequence[Claim]) -> None:
        with self._lock:
            for claim in claims:
                self._flights.get(claim.worker_id, {}).pop(claim.request_id, None)

    def live_workers(self) -> list[WorkerInfo]:
        with self._lock:
            return self._live()

    def held_blocks(self) -> dict[str, int]:
        with self._lock:
            return {worker_id: len(held) for worker_id, held in self._held.items()}

    def forget_worker(self, worker_id: str) -> None:
        with self._lock:
            self._drop_all(worker_id)
            self._held.pop(worker_id, None)
            self._workers.pop(worker_id, None)
            self._expires.pop(worker_id, None)
            self._epochs.pop(worker_id, None)
            self._flights.pop(worker_id, None)
            self._beats.pop(worker_id, None)

    def sweep(self) -> int:
        now = self._clock()
        with self._lock:
            dead = [w for w in self._epochs if self._expires.get(w, 0.0) <= now]
        for worker_id in dead:
            self.forget_worker(worker_id)
        return len(dead)

    def health(self) -> IndexHealth:
        return IndexHealth(available=True, outages=0, failed_calls=0)

    def _live(self) -> list[WorkerInfo]:
        now = self._clock()
        live = []
        for worker in self._workers.values():
            if self._expires[worker.worker_id] > now:
                flights = self._flights.get(worker.worker_id)
                live.append(replace(worker, in_flight=self._in_flight(worker.worker_id, now)) if flights else worker)
        return live

    def _in_flight(self, worker_id: str, now: float) -> InFlight:
        flights = self._flights[worker_id]
        for request_id in [r for r, flight in flights.items() if flight.expiry <= now]:
            del flights[request_id]
        beat = self._beats.get(worker_id, 0.0)
        unreported = [f for f in flights.values() if f.placed_at >= beat]
        return InFlight(
            requests=len(flights),
            unreported_tokens=sum(f.tokens for f in unreported),
            tokens=sum(f.tokens for f in flights.values()),
            unreported_kv_tokens=sum(f.kv_tokens for f in unreported),
            kv_tokens=sum(f.kv_tokens for f in flights.values()),
        )

    def _advance_epoch(self, worker_id: str, epoch: int) -> bool:
        """False for a stale epoch; a newer one drops everything the old incarnation held."""
        known = self._epochs.get(worker_id)
        if known is not None and epoch < known:
            return False
        if known is not None and epoch > known:
            self._drop_all(worker_id)
        self._epochs[worker_id] = epoch
        return True

    def _drop(self, worker_id: str, digest: bytes) -> None:
        holders = self._holders.get(digest)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[digest]

    def _drop_all(self, worker_id: str) -> None:
        for digest in self._held.get(worker_id, set()):
            self._drop(worker_id, digest)
        self._held[worker_id] = set()
