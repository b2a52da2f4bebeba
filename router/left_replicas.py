"""The replicas that left a worker pool's routing set: Serve is draining them (scale-down, redeploy), or they died.

Serve builds each request router itself and hands it no object of ours, so the
request routers of one process record here and the service reads from here.
A module of its own: Serve pickles the request router's module by value, which
would give the router its own copy of anything defined beside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import ClassVar


class LeftReplicas:
    """One record per process, keyed by replica id (unique across deployments), entries kept ``_KEEP_S``."""

    _KEEP_S = 600.0
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _left: ClassVar[dict[str, float]] = {}

    @classmethod
    def record(cls, replica_ids: Iterable[str]) -> None:
        now = time.monotonic()
        with cls._lock:
            for replica_id in replica_ids:
                cls._left.setdefault(replica_id, now)
            for replica_id, since in list(cls._left.items()):
                if now - since > cls._KEEP_S:
                    del cls._left[replica_id]

    @classmethod
    def since(cls) -> dict[str, float]:
        """Replica id → ``time.monotonic()`` when it left."""
        with cls._lock:
            return dict(cls._left)
