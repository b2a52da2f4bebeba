"""The prefix index: which worker holds which blocks. Memory and Redis backends, one interface."""

from __future__ import annotations

from router.index.base import Claim, IndexHealth, InFlight, PrefixIndex, Role, WorkerInfo, WorkerLoad
from router.index.memory import MemoryPrefixIndex

__all__ = [
    "Claim",
    "IndexHealth",
    "InFlight",
    "MemoryPrefixIndex",
    "PrefixIndex",
    "Role",
    "WorkerInfo",
    "WorkerLoad",
    "make_index",
]


def make_index(redis_url: str | None, model_id: str, timeout_s: float = 0.5) -> PrefixIndex:
    """The Redis index when a URL is given, else the in-memory one (the single-router default)."""
    if not redis_url:
        return MemoryPrefixIndex()
    from router.index.redis_index import RedisPrefixIndex

    return RedisPrefixIndex(redis_url, model_id, timeout_s)
