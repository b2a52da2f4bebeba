"""The prefix index's narrow interface, shared by the memory and Redis backends.

The index answers one question per request: for each live worker, how many
leading blocks of this hash chain does it hold? Its writes are the workers'
cache events and heartbeats. A worker restarted with a higher epoch drops its
old entries; a worker whose heartbeat lapses stops counting at once.

The index also counts the placements in flight on each worker, from every
router that shares it: a router ``reserve``s a worker when it places a request
there and ``release``s it when that worker is done with the request. Heartbeats
lag by up to a beat; these counts are current within a round trip, so N
routers placing at once see each other's placements (no stampede onto the
holder of a hot prefix), and the tokens placed since a worker's last heartbeat
are added to the queue it reported. A router that dies stops renewing its
reservations, and they lapse after their TTL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

from engine.cache_events import CacheEvent
from engine.types import WorkerLoad

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class InFlight:
    """Placements on a worker that routers have made and not yet released: the router-side load."""

    requests: int = 0
    unreported_tokens: int = 0  # prompt tokens placed there since its last heartbeat, so not in its figures yet
    tokens: int = 0  # prompt tokens of them all: on a prefill worker, the work placed there and not yet done
    unreported_kv_tokens: int = 0  # KV placed there since its last heartbeat (a decode worker's new blocks)
    kv_tokens: int = 0  # KV of them all, including requests the worker has not been handed yet


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as reported by its heartbeat (``load``), with the index's own ``in_flight`` count."""

    worker_id: str
    role: Role
    epoch: int
    block_size: int
    load: WorkerLoad = field(default_factory=WorkerLoad)
    in_flight: InFlight = field(default_factory=InFlight)
    cpu_cores: str = ""  # the cores its engine binds (VLLM_CPU_OMP_THREADS_BIND), for `pdserve status`

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["in_flight"]  # the index's count, never part of what a worker reports
        return data

    @classmethod
    def from_dict(cls, data: dict) -> WorkerInfo:
        return cls(**{**data, "load": WorkerLoad(**data["load"])})


@dataclass(frozen=True)
class Claim:
    """One worker's share of one placement: the prompt tokens it computes (0 for a decode taking shipped KV), and
    on a decode worker the KV it will hold for the prompt (the tokens it lacks, computed or shipped: a prefix it
    caches is shared, not held twice)."""

    request_id: str
    worker_id: str
    tokens: int = 0
    kv_tokens: int = 0


@dataclass(frozen=True)
class IndexHealth:
    available: bool
    outages: int
    failed_calls: int


class PrefixIndex(Protocol):
    network_io: bool  # True: calls go to a server, so an event loop runs them in a thread

    def apply_events(self, worker_id: str, epoch: int, events: Sequence[CacheEvent]) -> None:
        """Record a batch of one worker's cache events; events from an older epoch are ignored."""

    def heartbeat(self, worker: WorkerInfo, ttl_s: float) -> bool | None:
        """Mark ``worker`` live for ``ttl_s`` seconds with its load; a newer epoch drops its old entries.

        False: the index did not know this incarnation (a new worker, an index restarted empty, or its
        entries collected), so the worker re-sends what it holds. None: the index could not be reached."""

    def match(self, chain: Sequence[bytes]) -> tuple[list[WorkerInfo], dict[str, int]]:
        """Live workers with their in-flight counts, and for each the leading blocks of ``chain`` it holds.

        One round trip."""

    def reserve(self, claims: Sequence[Claim], ttl_s: float) -> None:
        """Count each claim in flight on its worker for ``ttl_s``; reserving a claim again renews it."""

    def release(self, claims: Sequence[Claim]) -> None:
        """Those workers are done with those requests: the claims stop counting."""

    def live_workers(self) -> list[WorkerInfo]: ...

    def held_blocks(self) -> dict[str, int]:
        """How many blocks the index records for each worker it knows (the index's size, for status)."""

    def forget_worker(self, worker_id: str) -> None:
        """Drop a worker and every entry it holds."""

    def sweep(self) -> int:
        """Collect the entries of workers whose liveness lapsed; returns how many workers were collected."""

    def health(self) -> IndexHealth: ...
