"""Autoscaling against a step load: fixed pools sized for the peak vs Serve's default policy vs pdserve's.

One trace (open loop, Poisson arrivals, the rate and the prompt/output mix stepping from phase to
phase) runs against three services started one after another in this invocation:

- ``fixed``: both worker pools at their most replicas all along (sized for the peak: the baseline);
- ``serve_default``: Serve's own policy (ongoing requests per replica, its default target);
- ``pdserve``: pdserve's pool policies under the coordinated application-level policy.

Each request is judged against one SLO (TTFT and TPOT together), calibrated in
this invocation from the fixed run's first, low-rate phase (``slo_ttft_x`` and
``slo_tpot_x`` times its medians), so the verdict does not depend on the
machine's speed. Replica-seconds are the worker replicas Serve holds (any
state but stopped), sampled every ``sample_s`` over the trace.

Two sizings. On vLLM (the default) the pools are at most 2 + 2 replicas, all the two cores hold. On
the simulated engine (``simulated_trace``, #22 item 4) the peak needs 3 or more prefill and 6 or more
decode replicas: a prompt-heavy phase loads the prefill pool, then a decode-heavy one (short prompts,
long outputs) the decode pool, so the P:D ratio has to move, and a last low phase scales both down
while streams run.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.load import SLO, Record, send_at, summarize, ttft_parts_mean_ms
from bench.placement_live import simulated_engine
from bench.running import with_service
from bench.workloads import Turn
from pdserve.config import PdserveConfig
from pdserve_pb.v1 import generate_pb2 as pb
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc

POOLS = {"prefill": "PrefillWorker", "decode": "DecodeWorker"}
HELD = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "STOPPING")  # replica states that hold resources


@dataclass(frozen=True)
class Phase:
    rate: float  # requests per second
    seconds: float
    input_tokens: int = 512  # each request's means, spread by the trace's ``spread``
    output_tokens: int = 64


@dataclass(frozen=True)
class StepTrace:
    phases: tuple[Phase, ...] = (Phase(0.5, 45.0), Phase(2.0, 75.0), Phase(0.5, 75.0))
    spread: float = 0.5
    max_prefill_replicas: int = 2
    max_decode_replicas: int = 2
    target_queued_prefill_tokens: float = 2048  # pdserve's prefill target per replica
    queue_growth_horizon_s: float = 0.0  # pdserve's prefill projection of a growing queue (0: off, the default)
    target_running_seqs: float = 8  # pdserve's decode target per replica
    prefill_dispatch_limit_tokens: int | None = None  # the routers hold prompts past it (every service alike)
    slo_ttft_x: float = 4.0
    slo_tpot_x: float = 3.0
    sample_s: float = 0.5
    seed: int = 0

    def arrivals(self) -> list[tuple[float, Phase]]:
        """Arrival times (seconds in), each with its phase: a Poisson process whose rate steps from phase to phase."""
        rng, times, begin = random.Random(self.seed), [], 0.0
        for phase in self.phases:
            at = begin + rng.expovariate(phase.rate)
            while at < begin + phase.seconds:
                times.append((at, phase))
                at += rng.expovariate(phase.rate)
            begin += phase.seconds
        return times

    def requests(self, vocab_size: int) -> list[tuple[float, Turn]]:
        rng = random.Random(self.seed + 1)

        def length(mean: int) -> int:
            return max(1, round(mean * rng.uniform(1 - self.spread, 1 + self.spread)))

        return [(at, Turn([rng.randrange(2, vocab_size) for _ in range(length(phase.input_tokens))],
                          length(phase.output_tokens))) for at, phase in self.arrivals()]  # fmt: skip


SIMULATED_TIME_SCALE = 20.0  # the hardware profile slowed so much: 12 workers' CPU on two cores stays small beside it
SIMULATED_KV_TOKENS = 6144  # each worker's KV pool: the decode pool is KV-bound at the peak


def simulated_trace(seed: int = 0) -> StepTrace:
    """The step trace at cluster scale, for ``llama-3.1-8b-h100`` slowed ``SIMULATED_TIME_SCALE`` times.

    Prompt-heavy phase: 2,048-token prompts take ~0.75 s of prefill each, so 3/s needs 3 prefill replicas
    at least. Decode-heavy phase: 2/s × 256 output tokens at ~92 ms a step keeps ~47 streams running, 6 or
    more decode replicas at 6 running sequences each. The routers hold a prompt while every prefill worker
    queues two prompts' worth (~1.5 s of work, more than a heartbeat's): a replica added in the burst takes
    the prompts held, not only those arriving after it starts."""
    phases = (Phase(0.3, 45.0, 1024, 64), Phase(3.0, 75.0, 2048, 32), Phase(2.0, 75.0, 256, 256),
              Phase(0.3, 60.0, 1024, 64))  # fmt: skip
    return StepTrace(phases=phases, max_prefill_replicas=4, max_decode_replicas=8,
                     target_queued_prefill_tokens=2048, queue_growth_horizon_s=10, target_running_seqs=6,
                     prefill_dispatch_limit_tokens=4096,
                     seed=seed)  # fmt: skip


def settings(trace: StepTrace) -> dict[str, dict]:
    """The three services, as config overrides: the same bounds and delays for both autoscalers, the same
    router for all three."""
    most = {"prefill": trace.max_prefill_replicas, "decode": trace.max_decode_replicas}
    timing = {"upscale_delay_s": 2, "downscale_delay_s": 15, "look_back_period_s": 4, "metrics_interval_s": 0.5}
    bounds = {pool: {"min_replicas": 1, "max_replicas": most[pool], **timing} for pool in POOLS}
    fixed = {f"service.{pool}.num_replicas": most[pool] for pool in POOLS}
    serve_default = {f"service.{pool}.autoscaling_config": bounds[pool] for pool in POOLS}
    pdserve = {
        "service.prefill.autoscaling": {**bounds["prefill"],
                                        "target_queued_prefill_tokens": trace.target_queued_prefill_tokens,
                                        "queue_growth_horizon_s": trace.queue_growth_horizon_s},
        "service.decode.autoscaling": {**bounds["decode"], "target_running_seqs": trace.target_running_seqs},
        "service.coordination": {"ratio_slack": 2.0},
    }  # fmt: skip
    router = {}
    if trace.prefill_dispatch_limit_tokens is not None:
        router = {"router.placement.prefill_dispatch_limit_tokens": trace.prefill_dispatch_limit_tokens}
    return {name: {**router, **pools} for name, pools in
            {"fixed": fixed, "serve_default": serve_default, "pdserve": pdserve}.items()}  # fmt: skip


@dataclass(frozen=True)
class Sample:
    at_s: float
    held: int  # worker replicas holding resources, both pools
    running: dict[str, int]  # RUNNING replicas per pool
    starting: dict[str, int]  # STARTING replicas per pool: the autoscaler asked for them, they are not serving yet
    load: dict[str, dict] | None  # per pool, its workers' load summed as their heartbeats report it (None: no answer)


async def run_trace(grpc_address: str, app_name: str, requests: list[tuple[float, Turn]], sample_s: float):
    """Every request at its arrival time; returns the records and the worker replicas over time."""
    from ray import serve

    records: list[Record] = []
    samples: list[Sample] = []
    channel = grpc.aio.insecure_channel(grpc_address)
    stub = pb_grpc.GenerationStub(channel)
    begun = time.perf_counter()
    done = asyncio.Event()

    def replica_states() -> dict[str, dict]:
        deployments = serve.status().applications[app_name].deployments
        return {pool: deployments[name].replica_states for pool, name in POOLS.items()}

    async def pool_load() -> dict[str, dict] | None:
        """What each pool's autoscaling policy weighs, from the router's status (the workers' last heartbeats), and
        where the prefill pool's prompts wait: on each replica (its queue) or in the router (held for room)."""
        try:
            status = await stub.Status(pb.StatusRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return None
        load = {pool: {"running_seqs": 0, "waiting_seqs": 0, "queued_prefill_tokens": 0, "kv_used": 0.0}
                for pool in POOLS}  # fmt: skip
        for worker in status.workers:
            pool = load.get(worker.role)
            if pool is not None:
                pool["running_seqs"] += worker.running_seqs
                pool["waiting_seqs"] += worker.waiting_seqs
                pool["queued_prefill_tokens"] += worker.queued_prefill_tokens
                pool["kv_used"] += worker.kv_used_fraction
        load["prefill"]["queued_per_replica"] = [w.queued_prefill_tokens for w in status.workers if w.role == "prefill"]
        load["prefill"]["held_in_router"] = status.prefill_held_tokens
        return {pool: {**figures, "kv_used": round(figures["kv_used"], 2)} for pool, figures in load.items()}

    async def sampling() -> None:
        while not done.is_set():
            at, states, load = time.perf_counter() - begun, await asyncio.to_thread(replica_states), await pool_load()
            held = sum(counts.get(state, 0) for counts in states.values() for state in HELD)
            running = {pool: counts.get("RUNNING", 0) for pool, counts in states.items()}
            samples.append(Sample(at, held, running, {pool: c.get("STARTING", 0) for pool, c in states.items()}, load))
            await asyncio.sleep(sample_s)

    sampler = asyncio.create_task(sampling())
    try:
        await asyncio.gather(*(send_at(stub, begun, at, n, turn, records) for n, (at, turn) in enumerate(requests)))
    finally:
        done.set()
        await sampler
        await channel.close()
    return sorted(records, key=lambda r: r.start_s), samples, time.perf_counter() - begun


def replica_seconds(held: list[tuple[float, int]], until_s: float) -> float:
    """The area under the replicas-held curve, each sample standing until the next."""
    total = 0.0
    for (at, count), (next_at, _) in zip(held, [*held[1:], (until_s, 0)], strict=True):
        total += count * max(0.0, min(next_at, until_s) - at)
    return total


def streams_in_scale_down(records: list[Record], asked: list[int], samples: list[Sample]) -> tuple[int, int]:
    """(streams running when a decode replica left, those of them that failed or came back short).

    A replica left between two samples where the RUNNING decode count fell; a stream ran then if it began
    before the later sample and had not ended by the earlier one (a failed one counts as running on)."""
    downs = [(before.at_s, after.at_s) for before, after in zip(samples, samples[1:], strict=False)
             if after.running["decode"] < before.running["decode"]]  # fmt: skip
    running = {
        r.session for r in records for since, until in downs
        if r.start_s < until and (r.error or r.start_s + r.e2e_s > since)
    }  # fmt: skip
    by_session = {r.session: r for r in records}
    lost = [n for n in running if by_session[n].error or by_session[n].output_tokens < asked[n]]
    return len(running), len(lost)


def by_phase(trace: StepTrace, records: list[Record], slo: SLO) -> list[dict]:
    """Each phase's requests (by arrival), the share that met the SLO, and how many missed it on TTFT and on TPOT,
    so a miss is traced to the step it followed."""
    phases, begin = [], 0.0
    for phase in trace.phases:
        mine = [r for r in records if begin <= r.start_s < begin + phase.seconds]
        done = [r for r in mine if not r.error]
        late = [r for r in done if r.ttft_s * 1000 > slo.ttft_ms]
        phases.append({
            "requests": len(mine),
            "slo_attainment": sum(slo.met(r) for r in mine) / max(len(mine), 1),
            "ttft_missed": len(late),
            "tpot_missed": sum(r.tpot_s * 1000 > slo.tpot_ms for r in done),
            "errors": len(mine) - len(done),
            "ttft_missed_arrivals_s": [round(r.start_s - begin, 1) for r in late],
            "ttft_missed_parts_mean_ms": {part: round(ms, 1) for part, ms in ttft_parts_mean_ms(late).items()},
        })  # fmt: skip
        begin += phase.seconds
    return phases


def scaling_events(samples: list[Sample]) -> list[tuple[float, str, int, int]]:
    """Each change of a pool's replicas as sampled: (seconds in, pool, RUNNING, STARTING), so the time from the
    ask (STARTING up) to serving (RUNNING up) reads off the run."""
    events, last = [], {}
    for sample in samples:
        for pool in POOLS:
            now = (sample.running[pool], sample.starting[pool])
            if last.get(pool) != now:
                events.append((round(sample.at_s, 1), pool, *now))
                last[pool] = now
    return events


def calibrate(trace: StepTrace, records: list[Record]) -> SLO:
    """The SLO: multiples of the medians the fixed pools give in the first, low-rate phase."""
    first_phase = [r for r in records if not r.error and r.start_s < trace.phases[0].seconds]
    return SLO(trace.slo_ttft_x * 1000 * statistics.median(r.ttft_s for r in first_phase),
               trace.slo_tpot_x * 1000 * statistics.median(r.tpot_s for r in first_phase))  # fmt: skip


def run_autoscale(config: PdserveConfig, trace: StepTrace, vocab_size: int, engine: str = "vllm") -> dict:
    requests = trace.requests(vocab_size)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="pdserve-autoscale-") as folder:
        engine_overrides = {}
        if engine == "simulated":
            blocks = SIMULATED_KV_TOKENS // config.engine.block_size
            engine_overrides = simulated_engine(Path(folder), SIMULATED_TIME_SCALE, blocks)
        for name, overrides in settings(trace).items():
            runs[name] = with_service(config, {**engine_overrides, **overrides}, lambda s: asyncio.run(
                run_trace(s.grpc_address, s.config.service.app_name, requests, trace.sample_s)))  # fmt: skip
    slo = calibrate(trace, runs["fixed"][0])
    asked = [turn.max_tokens for _, turn in requests]
    report = {}
    for name, (records, samples, wall_s) in runs.items():
        summary = summarize(records, wall_s, slo)
        in_scale_down, lost = streams_in_scale_down(records, asked, samples)
        report[name] = {
            "slo_attainment": summary["slo_attainment"],
            "by_phase": by_phase(trace, records, slo),
            "replica_seconds": replica_seconds([(s.at_s, s.held) for s in samples], wall_s),
            "errors": summary["errors"],
            "peak_replicas": {pool: max((s.running[pool] for s in samples), default=0) for pool in POOLS},
            "streams_running_in_scale_down": in_scale_down,
            "streams_lost_in_scale_down": lost,
            "ttft": summary["ttft"],
            "tpot": summary["tpot"],
            "scaling_events": scaling_events(samples),
            "running_over_time": [
                (round(s.at_s), s.running, s.starting, s.load) for s in samples[:: max(1, round(5 / trace.sample_s))]
            ],  # fmt: skip
        }
    fixed, default, ours = report["fixed"], report["serve_default"], report["pdserve"]
    return {
        "slo_attainment_vs_fixed_peak": ours["slo_attainment"] / max(fixed["slo_attainment"], 1e-9),
        "replica_seconds_vs_fixed_peak": ours["replica_seconds"] / fixed["replica_seconds"],
        "slo_attainment_vs_serve_default": ours["slo_attainment"] / max(default["slo_attainment"], 1e-9),
        "peak_decode_replicas": ours["peak_replicas"]["decode"],
        "peak_prefill_replicas": ours["peak_replicas"]["prefill"],
        "streams_lost_in_scale_down": ours["streams_lost_in_scale_down"],
        "engine": engine,
        "slo": asdict(slo),
        "trace": {**asdict(trace), "requests": len(requests)},
        "settings": report,
    }


def write(result: dict, out: Path) -> Path:
    """``autoscale.json`` for vLLM, ``autoscale_simulated.json`` for the simulated engine."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("autoscale_simulated.json" if result["engine"] == "simulated" else "autoscale.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
