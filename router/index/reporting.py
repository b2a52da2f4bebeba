"""How a worker replica's heartbeats and cache events reach the prefix index.

Built by the composition and handed (pickled) to each worker, which starts it
in its own process. With Redis, the worker writes to the index itself. With the
in-memory index (one router replica holds it), it writes to that replica over
the router's index-writer listener (``router/index/remote_writer.py``), not
through a Serve handle. Either way, heartbeats and events are written batched
per callback, and a worker the index lost track of re-sends what it holds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

from pydantic import SecretStr

from engine.cache_events import AllCleared, BlocksRemoved, BlocksStored, CacheEvent
from router.config import IndexConfig
from router.index import WorkerInfo, WorkerLoad, make_index
from router.index.remote_writer import RemoteIndexWriter

log = logging.getLogger(__name__)

_LOCATE_TIMEOUT_S = 5.0  # the router's address, through Serve (its first call starts the handle)


class IndexReporting:
    """Where workers report: Redis when a URL is given, else the router replica that holds the index."""

    def __init__(
        self,
        model_id: str,
        index: IndexConfig,
        cluster_token: SecretStr,
        app_name: str = "pdserve",
        router_deployment: str = "Router",
    ):
        self.model_id = model_id
        self.index = index
        self.cluster_token = cluster_token
        self.app_name = app_name
        self.router_deployment = router_deployment

    def start(self, worker_id: str, role: str, block_size: int, cpu_cores: str = "") -> IndexReporter:
        # A restarted replica gets a new id; the epoch still orders two lives of one id.
        info = WorkerInfo(worker_id, role, time.time_ns() // 1000, block_size, cpu_cores=cpu_cores)
        url, timeout_s = self.index.connection_url(), self.index.timeout_s  # the URL as this worker's node has it
        if url is not None:
            index = make_index(url, self.model_id, timeout_s)
        else:
            index = RemoteIndexWriter(self._router_address, self.cluster_token.get_secret_value(), timeout_s)
        return IndexReporter(info, self.index.heartbeat_ttl_s, index)

    def _router_address(self) -> str:
        from ray import serve

        router = serve.get_deployment_handle(self.router_deployment, self.app_name)
        return router.index_writer_address.remote().result(timeout_s=_LOCATE_TIMEOUT_S)


class IndexReporter:
    """One worker's live reporter, writing to Redis or to the router's in-memory index.

    It keeps the set of blocks its worker holds (what its events said), so when a
    heartbeat finds the index without this worker (Redis or the router restarted
    empty, or the worker was forgotten while alive), or the index came back from an
    outage that lost some events, it re-sends them all at once (one write): the hit
    rate comes back with the next beat instead of as the cache turns over.
    """

    def __init__(self, info: WorkerInfo, ttl_s: float, index):
        self._info = info
        self._ttl_s = ttl_s
        self._index = index
        self._held: dict[bytes, None] = {}  # insertion-ordered set: parents before children
        self._lock = threading.Lock()  # events and heartbeats come from two threads
        self._outages_synced = 0

    def report_load(self, load: WorkerLoad) -> None:
        info = replace(self._info, load=load)
        with self._lock:
            known = self._index.heartbeat(info, self._ttl_s)
            outages = self._index.health().outages  # events sent during an outage were lost
            if known is None or (known and outages == self._outages_synced):
                return
            self._index.apply_events(
                self._info.worker_id, self._info.epoch, [AllCleared(), BlocksStored(list(self._held), None)]
            )
            self._outages_synced = outages
            log.info("%s re-sent its %d cached blocks to the index", self._info.worker_id, len(self._held))

    def report_events(self, events: list[CacheEvent]) -> None:
        with self._lock:
            for event in events:
                if isinstance(event, BlocksStored):
                    self._held.update(dict.fromkeys(event.hashes))
                elif isinstance(event, BlocksRemoved):
                    for digest in event.hashes:
                        self._held.pop(digest, None)
                elif isinstance(event, AllCleared):
                    self._held.clear()
            self._index.apply_events(self._info.worker_id, self._info.epoch, events)

    def close(self) -> None:
        self._index.forget_worker(self._info.worker_id)
