"""Autoscaling against a step load: fixed over-provisioned pools vs Serve's default policy vs pdserve's.

One trace (open loop, Poisson arrivals, the rate stepping low → high → low)
runs against three services started one after another in this invocation:

- ``fixed``: both worker pools at their most replicas all along (the baseline);
- ``serve_default``: Serve's own policy (ongoing requests per replica, its default target);
- ``pdserve``: pdserve's pool policies under the coordinated application-level policy.

Each request is judged against one SLO (TTFT and TPOT together), calibrated in
this invocation from the fixed run's first, low-rate phase (``slo_ttft_x`` and
``slo_tpot_x`` times its medians), so the verdict does not depend on the
machine's speed. Replica-seconds are the worker replicas Serve holds (any
state but stopped), sampled every ``sample_s`` over the trace.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.load import SLO, Record, send_at, summarize
from bench.running import with_service
from bench.workloads import Turn
from pdserve.config import PdserveConfig
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc

WORKER_POOLS = ("PrefillWorker", "DecodeWorker")
HELD = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "STOPPING")  # replica states that hold resources


@dataclass(frozen=True)
class StepTrace:
    phases: tuple[tuple[float, float], ...] = ((0.5, 45.0), (2.0, 75.0), (0.5, 75.0))  # (requests per s, seconds)
    input_tokens: int = 512
    output_tokens: int = 64
    spread: float = 0.5
    max_replicas: int = 2
    slo_ttft_x: float = 4.0
    slo_tpot_x: float = 3.0
    sample_s: float = 0.5
    seed: int = 0

    def arrivals(self) -> list[float]:
        """Arrival times (seconds in): a Poisson process whose rate steps from phase to phase."""
        rng, times, begin = random.Random(self.seed), [], 0.0
        for rate, seconds in self.phases:
            at = begin + rng.expovariate(rate)
            while at < begin + seconds:
                times.append(at)
                at += rng.expovariate(rate)
            begin += seconds
        return times

    def requests(self, vocab_size: int) -> list[tuple[float, Turn]]:
        rng = random.Random(self.seed + 1)

        def length(mean: int) -> int:
            return max(1, round(mean * rng.uniform(1 - self.spread, 1 + self.spread)))

        return [(at, Turn([rng.randrange(2, vocab_size) for _ in range(length(self.input_tokens))],
                          length(self.output_tokens))) for at in self.arrivals()]  # fmt: skip


def settings(trace: StepTrace) -> dict[str, dict]:
    """The three services, as config overrides: the same bounds and delays for both autoscalers."""
    bounds = {"min_replicas": 1, "max_replicas": trace.max_replicas, "upscale_delay_s": 2, "downscale_delay_s": 15,
              "look_back_period_s": 4, "metrics_interval_s": 0.5}  # fmt: skip
    fixed = {f"service.{pool}.num_replicas": trace.max_replicas for pool in ("prefill", "decode")}
    serve_default = {f"service.{pool}.autoscaling_config": bounds for pool in ("prefill", "decode")}
    pdserve = {
        "service.prefill.autoscaling": {**bounds, "target_queued_prefill_tokens": 4 * trace.input_tokens},
        "service.decode.autoscaling": {**bounds, "target_running_seqs": 8},
        "service.coordination": {"ratio_slack": 2.0},
    }
    return {"fixed": fixed, "serve_default": serve_default, "pdserve": pdserve}


async def run_trace(grpc_address: str, app_name: str, requests: list[tuple[float, Turn]], sample_s: float):
    """Every request at its arrival time; returns the records and the worker replicas held over time."""
    from ray import serve

    records: list[Record] = []
    held: list[tuple[float, int]] = []
    channel = grpc.aio.insecure_channel(grpc_address)
    stub = pb_grpc.GenerationStub(channel)
    begun = time.perf_counter()
    done = asyncio.Event()

    def replicas() -> int:
        deployments = serve.status().applications[app_name].deployments
        return sum(deployments[d].replica_states.get(state, 0) for d in WORKER_POOLS for state in HELD)

    async def sample() -> None:
        while not done.is_set():
            held.append((time.perf_counter() - begun, await asyncio.to_thread(replicas)))
            await asyncio.sleep(sample_s)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(send_at(stub, begun, at, n, turn, records) for n, (at, turn) in enumerate(requests)))
    finally:
        done.set()
        await sampler
        await channel.close()
    return sorted(records, key=lambda r: r.start_s), held, time.perf_counter() - begun


def replica_seconds(held: list[tuple[float, int]], until_s: float) -> float:
    """The area under the replicas-held curve, each sample standing until the next."""
    total = 0.0
    for (at, count), (next_at, _) in zip(held, [*held[1:], (until_s, 0)], strict=True):
        total += count * max(0.0, min(next_at, until_s) - at)
    return total


def calibrate(trace: StepTrace, records: list[Record]) -> SLO:
    """The SLO: multiples of the medians the fixed pools give in the first, low-rate phase."""
    first_phase = [r for r in records if not r.error and r.start_s < trace.phases[0][1]]
    return SLO(trace.slo_ttft_x * 1000 * statistics.median(r.ttft_s for r in first_phase),
               trace.slo_tpot_x * 1000 * statistics.median(r.tpot_s for r in first_phase))  # fmt: skip


def run_autoscale(config: PdserveConfig, trace: StepTrace, vocab_size: int) -> dict:
    requests = trace.requests(vocab_size)
    runs = {}
    for name, overrides in settings(trace).items():
        runs[name] = with_service(config, overrides, lambda s: asyncio.run(
            run_trace(s.grpc_address, s.config.service.app_name, requests, trace.sample_s)))  # fmt: skip
    slo = calibrate(trace, runs["fixed"][0])
    report = {}
    for name, (records, held, wall_s) in runs.items():
        summary = summarize(records, wall_s, slo)
        report[name] = {
            "slo_attainment": summary["slo_attainment"],
            "replica_seconds": replica_seconds(held, wall_s),
            "errors": summary["errors"],
            "ttft": summary["ttft"],
            "tpot": summary["tpot"],
            "replicas_over_time": held[:: max(1, round(5 / trace.sample_s))],  # one sample per 5 s
        }
    fixed, default, ours = report["fixed"], report["serve_default"], report["pdserve"]
    return {
        "slo_attainment_vs_fixed": ours["slo_attainment"] / max(fixed["slo_attainment"], 1e-9),
        "replica_seconds_vs_fixed": ours["replica_seconds"] / fixed["replica_seconds"],
        "slo_attainment_vs_serve_default": ours["slo_attainment"] / max(default["slo_attainment"], 1e-9),
        "slo": asdict(slo),
        "trace": {**asdict(trace), "requests": len(requests)},
        "settings": report,
    }


def write(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "autoscale.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
