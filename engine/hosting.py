"""An engine hosted by a worker replica: its load and cache events go to a reporter.

The reporter is whatever the composition hands the worker (the prefix index,
directly or through the router); the engine only knows it through
``WorkerReporter``. A heartbeat thread sends the load every ``heartbeat_s``; a
worker whose heartbeats stop drops out of placement when their TTL lapses.

A worker also beats early (at most every ``_EARLY_BEAT_GAP_S``) when a prompt it
was computing is done. Routers add what they placed since a worker's last beat
to the queue that beat reported, but what the worker finished since would stay
counted until its next beat: the holder of a prefix sent again and again would
look busy to every router for up to a beat after each prompt, and they would
send the prefix elsewhere.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Protocol

from pydantic import SecretStr

from engine import autoscaling_stats as stats
from engine.cache_events import CacheEvent
from engine.config import EngineConfig
from engine.core_ledger import CoreLedger, CoreRequest, omp_bind
from engine.errors import EngineDeadError
from engine.factory import build_engine
from engine.model_source import ModelSource, on_this_node
from engine.throughput import BusyRate, TokensPerRequest
from engine.types import EngineStats, GenerateRequest, OutputDelta, WorkerLoad

log = logging.getLogger(__name__)

_EARLY_BEAT_GAP_S = 0.01  # the least time between two heartbeats: at most 100 a second, however many prompts


class WorkerReporter(Protocol):
    def report_load(self, load: WorkerLoad) -> None: ...

    def report_events(self, events: list[CacheEvent]) -> None: ...

    def close(self) -> None: ...


class Reporting(Protocol):
    """The picklable description a worker receives; ``start`` connects it inside the worker's process."""

    def start(self, worker_id: str, role: str, block_size: int, cpu_cores: str = "") -> WorkerReporter:
        """Called once, before the engine exists, so no cache event precedes the identity."""


@dataclass(frozen=True)
class WorkerSettings:
    """What the composition hands every worker replica besides its engine's config."""

    reporting: Reporting
    cluster_token: SecretStr  # KV peers prove they belong with it
    model: ModelSource  # made present on the replica's own node before the engine is built
    heartbeat_s: float = 1.0
    leave_s: float = 0.0  # how long leaving waits for peers to pull the KV still offered
    die_on_token: int | None = None  # fault injection (tests): a prompt holding this token id kills the process
    cores: CoreRequest | None = None  # cores to claim on the node (cpu_cores: auto); None: the engine config's
    shares_serving_cores: bool = False  # the serving processes run on the cores it claims (none reserved)


class HostedEngine:
    def __init__(
        self,
        config: EngineConfig,
        role: str,
        worker_id: str,
        reporting: Reporting,
        heartbeat_s: float = 1.0,
        die_on_token: int | None = None,
    ):
        self.worker_id = worker_id
        self.block_size = config.block_size
        self._die_on_token = die_on_token
        self._reporter = reporter = reporting.start(worker_id, role, config.block_size, config.cpu_cores or "")
        self.engine = build_engine(config, on_cache_events=reporter.report_events)
        self._queued_prefill_tokens = 0  # prompt tokens admitted that have not produced a token yet
        # For the coordinated autoscaler: what this worker sustains, and the requests it sees.
        self.prefill_rate, self.decode_rate = BusyRate(), BusyRate(per_request=True)
        self.prompt_tokens, self.output_tokens = TokensPerRequest(), TokensPerRequest()
        self._stop = threading.Event()
        self._beat_now = threading.Event()  # a prompt is done: the queue the index holds is out of date
        self._heartbeat_s = heartbeat_s
        self._heartbeat = threading.Thread(target=self._beat, name="pdserve-heartbeat", daemon=True)
        self._heartbeat.start()

    async def stream(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        """The engine's stream, counted as queued prefill until its first delta, decoding after; closing it aborts."""
        if self._die_on_token is not None and self._die_on_token in request.prompt_token_ids:
            log.error("request %s holds token %d: dying as configured", request.request_id, self._die_on_token)
            os.kill(os.getpid(), signal.SIGKILL)  # as a query of death would: no cleanup, no answer
        # A decode that takes its prompt's KV from a prefill worker computes none of it here: that prompt is
        # queued on the prefill worker.
        takes_kv = (request.kv_transfer_params or {}).get("pdserve") == "consume"
        waiting = 0 if takes_kv else len(request.prompt_token_ids)
        self._queued_prefill_tokens += waiting
        self.prefill_rate.begin()
        decoding = False
        arrived = time.monotonic()
        try:
            async for delta in self.engine.generate(request):
                if not decoding:
                    delta = replace(delta, worker_first_delta_s=time.monotonic() - arrived)
                    self._queued_prefill_tokens -= waiting
                    waiting = 0
                    self._beat_now.set()
                    computed = delta.prompt_tokens - delta.cached_prompt_tokens
                    self.prefill_rate.add(computed)
                    self.prompt_tokens.begin()
                    self.prompt_tokens.add(computed)
                    self.output_tokens.begin()
                    self.prefill_rate.end()
                    self.decode_rate.begin()
                    self.decode_rate.add(len(delta.token_ids) - 1)  # merged deltas: the rest were decoded
                    decoding = True
                else:
                    self.decode_rate.add(len(delta.token_ids))
                self.output_tokens.add(len(delta.token_ids))
                yield delta
        finally:
            if waiting:
                self._queued_prefill_tokens -= waiting
                self._beat_now.set()
            (self.decode_rate if decoding else self.prefill_rate).end()

    def load(self, stats: EngineStats) -> WorkerLoad:
        """The load the heartbeat reports, from one reading of the engine's stats."""
        return WorkerLoad(
            queued_prefill_tokens=max(self._queued_prefill_tokens, 0),
            running_seqs=stats.running,
            waiting_seqs=stats.waiting,
            kv_used_fraction=stats.kv_blocks_used / max(stats.kv_blocks_total, 1),
            kv_pool_tokens=stats.kv_blocks_total * self.block_size,
        )

    def check_health(self) -> None:
        """Raise when the engine loop has failed, so Serve replaces the replica."""
        self.engine.check_alive()
        if not self._heartbeat.is_alive():
            raise RuntimeError("the heartbeat thread stopped")

    def close(self, transfers_s: float = 0.0) -> None:
        """Leave: stop heartbeating and withdraw from the index (no router places here any more), give
        peers up to ``transfers_s`` to pull the KV still offered, then stop the engine."""
        self._stop.set()
        self._beat_now.set()
        self._heartbeat.join(self._heartbeat_s + 1)
        self._reporter.close()
        deadline = time.monotonic() + transfers_s
        try:
            while (held := self.engine.open_kv_transfers()) and time.monotonic() < deadline:
                time.sleep(0.05)
        except EngineDeadError:  # its transfers died with it
            held = 0
        if held:
            log.warning("%s leaves with %d transfers nobody pulled in %g s", self.worker_id, held, transfers_s)
        self.engine.shutdown()

    def _beat(self) -> None:
        while True:
            try:
                self.engine.check_alive()
            except EngineDeadError as exc:  # out of placement at once; Serve's health check replaces the replica
                log.error("%s: %s; leaving the index", self.worker_id, exc)
                self._reporter.close()
                return
            self._beat_now.clear()
            try:
                self._reporter.report_load(self.load(self.engine.stats()))
            except Exception as exc:  # a lost heartbeat is retried on the next beat; the TTL covers a few
                log.warning("heartbeat of %s failed: %s", self.worker_id, exc)
            if self._stop.wait(_EARLY_BEAT_GAP_S):
                return
            self._beat_now.wait(max(0.0, self._heartbeat_s - _EARLY_BEAT_GAP_S))
            if self._stop.is_set():
                return


def claim_cores(request: CoreRequest, worker_id: str) -> str | None:
    """Cores of this node no other engine binds; where the node has none left (a pool grew past what was
    planned), the engine shares the unreserved cores, and says so."""
    bind = CoreLedger().claim(os.getpid(), request)
    if bind is None:
        log.warning("%s: no free cores left on this node for %d rank(s) × %d; sharing the unreserved cores",
                    worker_id, request.ranks, request.per_rank)  # fmt: skip
        cores = request.engine_cores or sorted(request.node_cores)
        bind = (
            omp_bind([cores[r :: request.ranks] for r in range(request.ranks)]) if len(cores) >= request.ranks else None
        )
    return bind


class HostedWorker:
    """What every worker deployment answers besides its role's own call: load, health, shutdown.

    Scale-down: Serve takes the replica out of the routing set (the router stops placing on it and
    moves its streams off within ``router.recovery.drain_finish_s``), waits for its calls to end, then
    calls ``__del__``, which withdraws it from the index and waits ``leave_s`` for the KV still
    offered to be pulled, all within the pool's ``graceful_shutdown_timeout_s``."""

    _host: HostedEngine
    _leave_s: float = 0.0

    def _start(self, config: EngineConfig, role: str, worker_id: str, settings: WorkerSettings) -> None:
        self._leave_s = settings.leave_s
        config = on_this_node(config, settings.model)
        if settings.cores is not None and config.cpu_cores is None:
            config = config.model_copy(update={"cpu_cores": claim_cores(settings.cores, worker_id)})
        if settings.shares_serving_cores and config.nice is None:
            # The serving processes run on these cores (none reserved): ahead of them the ranks would starve
            # them (measured: streams stall, then burst). They stay at the replica's own niceness.
            config = config.model_copy(update={"nice": os.getpriority(os.PRIO_PROCESS, 0)})
        self._host = HostedEngine(
            config, role, worker_id, settings.reporting, settings.heartbeat_s, settings.die_on_token
        )

    def check_health(self) -> None:
        self._host.check_health()

    def transfer_stats(self, worker_id: str | None = None) -> dict[str, dict]:
        return self._host.engine.kv_transfer_stats()

    def kv_fingerprint(self, worker_id: str | None = None) -> dict | None:
        """What makes this engine's KV interchangeable (``KVFingerprint``, as a dict); None without a connector."""
        ranks = self._host.engine.kv_connector_handshake()
        return ranks[0]["fingerprint"] if ranks else None

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler reads the load the heartbeat reports, and the measured rates and lengths
        (the policies: pdserve/autoscaling.py); a figure not measured yet is left out."""
        host = self._host
        engine_stats = host.engine.stats()
        load = host.load(engine_stats)
        measured = {
            stats.PREFILL_TOKENS_PER_S: host.prefill_rate.rate(),
            stats.DECODE_TOKENS_PER_SEQ_S: host.decode_rate.rate(),
            stats.PROMPT_TOKENS_MEAN: host.prompt_tokens.value,
            stats.OUTPUT_TOKENS_MEAN: host.output_tokens.value,
        }
        return {
            stats.QUEUED_PREFILL_TOKENS: float(load.queued_prefill_tokens),
            stats.RUNNING_SEQS: float(engine_stats.sequences_to_serve),
            stats.KV_WANTED_FRACTION: engine_stats.kv_wanted_fraction,
            stats.KV_POOL_TOKENS: float(load.kv_pool_tokens),
            **{name: value for name, value in measured.items() if value is not None},
        }

    def __del__(self):
        host = getattr(self, "_host", None)
        if host is not None:
            host.close(self._leave_s)
