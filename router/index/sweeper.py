"""The background sweep: collects the entries of workers whose heartbeat lapsed.

A lapsed worker stops counting at once (matches skip it); its blocks stay in
the index until the sweep frees them, so a sweep every few seconds bounds the
garbage, not the correctness.
"""

from __future__ import annotations

import logging
import threading

from router.index.base import PrefixIndex

log = logging.getLogger(__name__)


class IndexSweeper:
    def __init__(self, index: PrefixIndex, interval_s: float):
        self._index = index
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-index-sweep", daemon=True)
        self.collected = 0

    def start(self) -> IndexSweeper:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                collected = self._index.sweep()
            except Exception:
                log.exception("index sweep failed")
                continue
            if collected:
                self.collected += collected
                log.info("index sweep collected %d dead workers", collected)
