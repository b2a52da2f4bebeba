"""The prefix index's narrow interface, shared by the memory and Redis backends.

The index answers one question per request: for each live worker, how many
leading blocks of this hash chain does it hold? Its writes are the workers'
cache events and heartbeats. A worker restarted with a higher epoch drops its
old entries; a worker whose heartbeat lapses stops counting at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

from engine.cache_events import CacheEvent

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class WorkerLoad:
    """Load figures a worker reports with each heartbeat."""

    queued_prefill_tokens: int = 0
    running_seqs: int = 0
    waiting_seqs: int = 0
    kv_used_fraction: float = 0.0


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: Role
    epoch: int
    block_size: int
    load: WorkerLoad = field(default_factory=WorkerLoad)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorkerInfo:
        return cls(**{**data, "load": WorkerLoad(**data["load"])})


@dataclass(frozen=True)
class IndexHealth:
    available: bool
    outages: int
    failed_calls: int


class PrefixIndex(Protocol):
    def apply_events(self, worker_id: str, epoch: int, events: Sequence[CacheEvent]) -> None:
        """Record a batch of one worker's cache events; events from an older epoch are ignored."""

    def heartbeat(self, worker: WorkerInfo, ttl_s: float) -> None:
        """Mark ``worker`` live for ``ttl_s`` seconds with its load; a newer epoch drops its old entries."""

    def match(self, chain: Sequence[bytes]) -> tuple[list[WorkerInfo], dict[str, int]]:
        """Live workers, and for each the number of leading blocks of ``chain`` it holds (one round trip)."""

    def live_workers(self) -> list[WorkerInfo]: ...

    def held_blocks(self) -> dict[str, int]:
        """How many blocks the index records for each worker it knows (the index's size, for status)."""

    def forget_worker(self, worker_id: str) -> None:
        """Drop a worker and every entry it holds."""

    def sweep(self) -> int:
        """Collect the entries of workers whose liveness lapsed; returns how many workers were collected."""

    def health(self) -> IndexHealth: ...
