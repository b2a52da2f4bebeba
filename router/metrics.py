"""The router's Prometheus metrics; names and buckets follow vLLM's (``pdserve:`` instead of ``vllm:``).

Inside a Ray cluster the request metrics are also Ray metrics (``ray_pdserve_*`` on
Ray's metrics export port), next to Serve's own.

Each ``RouterMetrics`` has its own registry (several routers in one test process
must not collide); ``/metrics`` renders it. Worker figures (KV use, running and
waiting sequences, queued prefill tokens) come from the workers' heartbeats in
the prefix index, read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

import ray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray.util import metrics

from router.index import IndexHealth, WorkerInfo

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class RouterMetrics:
    def __init__(self, model_id: str, health: Callable[[], IndexHealth]):
        self.registry = r = CollectorRegistry()
        self.ttft = _Mirrored(Histogram, "time_to_first_token_seconds", "Time to first token.", r, (), TTFT_BUCKETS)
        self.ttft_parts = _Mirrored(
            Histogram, "time_to_first_token_part_seconds", "Each request's time to first token in parts that add up "
            "to it: placement (admitted to placed: held for prefill room, waiting for a worker), prefill_handle "
            "(placed to the decode worker asked: waiting for the prefill worker's transfer handle), worker (the "
            "decode worker's own time to its first token, as it measured it: its queue, the KV pulled or the prompt "
            "computed, the first step), transit (the rest: the calls and streams between router and worker).",
            r, ("part",), TTFT_BUCKETS,
        )  # fmt: skip
        self.itl = _Mirrored(Histogram, "inter_token_latency_seconds", "Between output tokens.", r, (), ITL_BUCKETS)
        self.e2e = _Mirrored(Histogram, "e2e_request_latency_seconds", "End-to-end latency.", r, (), E2E_BUCKETS)
        self.requests = _Mirrored(Counter, "requests", "Finished requests by outcome.", r, ("outcome",))
        self.running = _Mirrored(Gauge, "router_requests_running", "Requests the router is serving now.", r)
        self.placements = _Mirrored(
            Counter, "placement_decisions", "Placement decisions by outcome and reason.", r, ("outcome", "reason")
        )
        self.prompt_tokens = _Mirrored(Counter, "prompt_tokens", "Prompt tokens by pool.", r, ("pool",))
        self.prefix_hit_tokens = _Mirrored(
            Counter,
            "prefix_cache_hit_tokens",
            "Prompt tokens a worker found in its prefix cache, measured (KV moved between workers is not).",
            r,
            ("pool",),
        )
        self.generation_tokens = _Mirrored(Counter, "generation_tokens", "Generated tokens.", r)
        self.prefill_fallbacks = _Mirrored(
            Counter, "prefill_fallbacks", "Prefills that failed and were redone on the decode worker.", r
        )
        self.migrations = _Mirrored(
            Counter, "decode_migrations", "Requests carried on to another decode worker after theirs was lost.", r
        )
        self.worker_deaths = _Mirrored(
            Counter, "worker_deaths", "Workers whose process died (or was cut off) under a request.", r, ("pool",)
        )
        self.poison_requests = _Mirrored(
            Counter, "poison_requests", "Requests failed because two workers died computing them.", r
        )
        self.waiting_for_worker = _Mirrored(
            Gauge, "router_requests_waiting_for_worker", "Requests waiting for a live decode worker.", r
        )
        self.prefill_queue_requests = _Mirrored(
            Gauge, "router_prefill_queue_requests", "Prompts the router holds until a prefill worker has room.", r
        )
        self.prefill_queue_tokens = _Mirrored(
            Gauge, "router_prefill_queue_tokens", "Prompt tokens the router holds until a prefill worker has room.", r
        )
        self.prefill_hold_timeouts = _Mirrored(
            Counter, "prefill_hold_timeouts", "Prompts held past prefill_hold_max_s, then placed over the limit.", r
        )
        self._health = health

    def render(self, workers: list[WorkerInfo], transfers: dict[str, dict[str, dict]] | None = None) -> bytes:
        """The registry, plus the live workers' load as of their last heartbeat and their KV transfer figures
        (worker → figures, ``_TransferCollector``), both read just now by the caller (off the event loop where
        they cross the network)."""
        extra = CollectorRegistry()
        extra.register(_WorkerCollector(workers, self._health))
        if transfers:
            extra.register(_TransferCollector(transfers))
        return generate_latest(self.registry) + generate_latest(extra)


class _Mirrored:
    """A metric in the router's registry (``pdserve:NAME``) and, inside a Ray cluster, in Ray's own metrics
    (``pdserve_NAME``, exported by Ray's metrics agent with the cluster's other metrics)."""

    def __init__(self, kind, name: str, doc: str, registry, labels: tuple[str, ...] = (), buckets=None):
        extra = {"buckets": buckets} if buckets else {}
        self._prom = kind(f"pdserve:{name}", doc, list(labels), registry=registry, **extra)
        self._labels = labels
        self._ray = None
        self._value = 0.0  # a Ray gauge is set, not moved
        if ray.is_initialized():
            ray_kind = {Histogram: metrics.Histogram, Counter: metrics.Counter, Gauge: metrics.Gauge}[kind]
            ray_extra = {"boundaries": list(buckets)} if buckets else {}
            self._ray = ray_kind(f"pdserve_{name}", doc, tag_keys=labels, **ray_extra)

    def labels(self, *values: str) -> _Bound:
        return _Bound(self, dict(zip(self._labels, values, strict=True)))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        (self._prom.labels(**tags) if tags else self._prom).observe(value)
        if self._ray is not None:
            self._ray.observe(value, tags=tags)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        (self._prom.labels(**tags) if tags else self._prom).inc(value)
        if self._ray is None:
            return
        if isinstance(self._prom, Gauge):
            self._value += value
            self._ray.set(self._value, tags=tags)
        elif value > 0:  # Ray's counters refuse a zero step
            self._ray.inc(value, tags=tags)

    def dec(self, value: float = 1.0) -> None:
        self.inc(-value)

    def set(self, value: float) -> None:
        """A gauge's value (no labels)."""
        self._prom.set(value)
        self._value = value
        if self._ray is not None:
            self._ray.set(value)


class _Bound:
    def __init__(self, metric: _Mirrored, tags: dict[str, str]):
        self._metric = metric
        self._tags = tags

    def observe(self, value: float) -> None:
        self._metric.observe(value, self._tags)

    def inc(self, value: float = 1.0) -> None:
        self._metric.inc(value, self._tags)


class _TransferCollector:
    """KV transfers per worker, named after vLLM's NIXL connector metrics; counters that restart with the worker.

    A worker's figures: ``pulls`` (backend → pulls, bytes, seconds), ``failures`` (cause → loads that failed
    and were recomputed), ``offers`` (final state → offers; ``expired``: leases that ran out)."""

    PULLS = {
        "pulls": ("kv_transfers", "KV pulls."),
        "bytes": ("kv_transfer_bytes", "Bytes of KV pulled."),
        "seconds": ("kv_transfer_seconds", "Seconds spent pulling KV."),
    }

    def __init__(self, transfers: dict[str, dict[str, dict]]):
        self._transfers = transfers

    def collect(self):
        workers = sorted(self._transfers.items())
        for key, (name, doc) in self.PULLS.items():
            family = CounterMetricFamily(f"pdserve:{name}", doc, labels=["backend", "worker"])
            for worker, figures in workers:
                for backend, pulls in sorted(figures.get("pulls", {}).items()):
                    family.add_metric([backend, worker], pulls.get(key, 0))
            yield family
        failures = CounterMetricFamily(
            "pdserve:kv_transfer_failures",
            "KV loads that failed and were recomputed, by cause (incompatible, timeout, integrity, not_found, "
            "unavailable, denied, bad_request, other).",
            labels=["cause", "worker"],
        )
        expired = CounterMetricFamily(
            "pdserve:kv_leases_expired", "Offers freed because their lease ran out.", labels=["worker"]
        )
        for worker, figures in workers:
            for cause, count in sorted(figures.get("failures", {}).items()):
                failures.add_metric([cause, worker], count)
            if "offers" in figures:
                expired.add_metric([worker], figures["offers"].get("expired", 0))
        yield failures
        yield expired


class _WorkerCollector:
    """Per-pool figures from the latest heartbeats, and the index's health."""

    def __init__(self, workers: list[WorkerInfo], health: Callable[[], IndexHealth]):
        self._workers = workers
        self._health = health

    def collect(self):
        per_worker = {
            "kv_cache_usage_perc": ("KV pool use, 0 to 1.", lambda w: w.load.kv_used_fraction),
            "num_requests_running": ("Sequences running.", lambda w: w.load.running_seqs),
            "num_requests_waiting": ("Sequences waiting.", lambda w: w.load.waiting_seqs),
            "queued_prefill_tokens": ("Prompt tokens not yet prefilled.", lambda w: w.load.queued_prefill_tokens),
            "requests_in_flight": ("Requests every router placed there, not yet released.",
                                   lambda w: w.in_flight.requests),
        }  # fmt: skip
        workers = self._workers
        for name, (doc, value) in per_worker.items():
            family = GaugeMetricFamily(f"pdserve:{name}", doc, labels=["pool", "worker"])
            for worker in workers:
                family.add_metric([worker.role, worker.worker_id], value(worker))
            yield family
        replicas = GaugeMetricFamily("pdserve:live_workers", "Live workers per pool.", labels=["pool"])
        for pool in ("prefill", "decode"):
            replicas.add_metric([pool], sum(w.role == pool for w in workers))
        yield replicas
        health = self._health()
        available = GaugeMetricFamily("pdserve:index_available", "1 while the prefix index answers.")
        available.add_metric([], 1.0 if health.available else 0.0)
        yield available
        outages = GaugeMetricFamily("pdserve:index_outages", "Times the prefix index became unreachable.")
        outages.add_metric([], health.outages)
        yield outages
