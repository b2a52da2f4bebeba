"""Placement measured in the service at cluster scale: 8 prefill and 16 decode simulated workers (#22 item 3).

The same trace runs against one fresh service per placement policy (``round_robin``, ``least_loaded``,
``prefix_aware``, and llm-d's scorer ``weighted_scores`` for comparison), started in this invocation:
the real router, index, placement and KV hand-off, the simulated engine behind them (its KV pool,
prefix cache and cache events are a vLLM worker's; its time is a hardware profile's). The trace is
multi-tenant, in the style of llm-d's prefix-cache benchmark: each tenant has a long shared context,
several users per tenant each keep a standing prefix of their own, and every request adds a fresh
question; Poisson arrivals, tenants and users drawn uniformly.

Each worker's KV pool holds about a quarter of the trace's working set, so a placement that keeps each
tenant on a few workers hits, and one that scatters tenants over every worker thrashes. The oracle is
the placement simulator (``bench/placement_sim.py``) on the same requests in the same order, choosing
the prefill worker whose cache holds most of each prompt, with the same pool size and cache size.

The profile is ``llama-3.1-8b-h100`` slowed ``time_scale`` times (link included), so that the CPU the
24 worker processes spend on two cores stays small beside the simulated time; ratios are unchanged.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.footprint import Footprint
from bench.load import Record, send_at, summarize
from bench.placement_sim import TraceRequest, simulate
from bench.running import on_the_simulated_engine, with_service
from bench.workloads import Turn
from engine.sim.profile import PROFILES
from pdserve.config import PdserveConfig
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc

POLICIES = ("round_robin", "least_loaded", "prefix_aware", "weighted_scores")  # the last llm-d's scorer, to compare


@dataclass(frozen=True)
class TenantTrace:
    tenants: int = 16
    context_tokens: int = 3072  # each tenant's shared context
    users_per_tenant: int = 4
    user_tokens: int = 128  # each user's standing prefix, after the tenant's context
    question_tokens: int = 64  # new in every request
    output_tokens: int = 16
    rate_per_s: float = 8.0
    duration_s: float = 60.0
    seed: int = 0

    def working_set_tokens(self) -> int:
        return self.tenants * (self.context_tokens + self.users_per_tenant * self.user_tokens)

    def requests(self, vocab_size: int) -> list[tuple[float, Turn]]:
        rng = random.Random(self.seed)

        def tokens(n: int) -> list[int]:
            return [rng.randrange(2, vocab_size) for _ in range(n)]

        contexts = [tokens(self.context_tokens) for _ in range(self.tenants)]
        users = [[tokens(self.user_tokens) for _ in range(self.users_per_tenant)] for _ in range(self.tenants)]
        requests, at = [], rng.expovariate(self.rate_per_s)
        while at < self.duration_s:
            tenant = rng.randrange(self.tenants)
            prompt = contexts[tenant] + rng.choice(users[tenant]) + tokens(self.question_tokens)
            requests.append((at, Turn(prompt, self.output_tokens)))
            at += rng.expovariate(self.rate_per_s)
        return requests


@dataclass(frozen=True)
class ClusterShape:
    prefill_workers: int = 8
    decode_workers: int = 16
    cache_share: float = 0.25  # of the trace's working set, each worker's KV pool
    time_scale: float = 10.0


def scaled_profile(scale: float) -> dict:
    """``llama-3.1-8b-h100`` with every time ``scale`` times longer (its link ``scale`` times slower)."""
    profile = asdict(PROFILES["llama-3.1-8b-h100"])
    for name in ("base_ms", "prefill_step_ms", "prefill_ms_per_token", "prefill_ms_per_token2",
                 "prefill_ms_per_context_pair", "decode_ms_per_seq", "decode_ms_per_context_token"):  # fmt: skip
        profile[name] *= scale
    profile["link_bytes_per_s"] /= scale
    profile["name"] = f"llama-3.1-8b-h100-x{scale:g}"
    profile["source"] = f"llama-3.1-8b-h100 slowed {scale:g} times (bench/placement_live.py); " + profile["source"]
    return profile


def kv_blocks(trace: TenantTrace, shape: ClusterShape, block_size: int) -> int:
    return max(1, round(trace.working_set_tokens() * shape.cache_share / block_size))


def simulated_engine(folder: Path, time_scale: float, num_kv_blocks: int) -> dict:
    """Config overrides for the simulated engine on ``scaled_profile(time_scale)`` (written to ``folder``)."""
    profile_path = folder / "profile.json"
    profile_path.write_text(json.dumps(scaled_profile(time_scale)))
    return on_the_simulated_engine(simulated_profile=str(profile_path), num_kv_blocks=num_kv_blocks)


def simulated_cluster(folder: Path, trace: TenantTrace, shape: ClusterShape, block_size: int) -> dict:
    """Config overrides for ``shape``'s fixed pools of simulated workers on the scaled profile (written to
    ``folder``), each with the KV pool ``shape.cache_share`` of ``trace``'s working set."""
    return {
        **simulated_engine(folder, shape.time_scale, kv_blocks(trace, shape, block_size)),
        "service.prefill.num_replicas": shape.prefill_workers, "service.decode.num_replicas": shape.decode_workers,
        "service.prefill.autoscaling": None, "service.decode.autoscaling": None, "service.coordination": None,
    }  # fmt: skip


async def replay(
    grpc_address: str, requests: list[tuple[float, Turn]], connections: int = 1, meanwhile: Awaitable | None = None
) -> tuple[list[Record], float]:
    """Every request at its arrival time, over gRPC (whose last message names the workers and the router),
    spread round-robin over ``connections`` TCP connections: each reaches one router replica. ``meanwhile``
    runs beside the requests (a fault at a set time)."""
    records: list[Record] = []
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel
    channels = [grpc.aio.insecure_channel(grpc_address, options=options) for _ in range(connections)]
    stubs = [pb_grpc.GenerationStub(channel) for channel in channels]
    begun = time.perf_counter()
    sends = [send_at(stubs[n % connections], begun, at, n, turn, records) for n, (at, turn) in enumerate(requests)]
    try:
        await asyncio.gather(*sends, *([meanwhile] if meanwhile else []))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return sorted(records, key=lambda r: r.session), time.perf_counter() - begun


def imbalance(counts: Counter, workers: int) -> float:
    """The busiest worker's requests over the mean, over every worker of the pool (idle ones count)."""
    total = sum(counts.values())
    return max(counts.values(), default=0) / (total / workers) if total else 0.0


def policy_figures(records: list[Record], wall_s: float, shape: ClusterShape) -> dict:
    done = [r for r in records if not r.error]
    summary = summarize(records, wall_s)
    prefill_pool = Counter(r.prompt_worker for r in done if r.prompt_worker != r.decode_worker)
    decode_pool = Counter(r.decode_worker for r in done)
    return {
        "requests": summary["requests"],
        "errors": summary["errors"],
        "hit_rate": summary["prefix_hit_rate"],
        "ttft_p50_ms": summary["ttft"]["p50_ms"],
        "ttft_p90_ms": summary["ttft"]["p90_ms"],
        "tpot_p50_ms": summary["tpot"]["p50_ms"],
        "local_prefill_share": sum(r.prompt_worker == r.decode_worker for r in done) / max(len(done), 1),
        "prefill_imbalance": imbalance(prefill_pool, shape.prefill_workers),
        "decode_imbalance": imbalance(decode_pool, shape.decode_workers),
    }


def oracle_figures(requests: list[tuple[float, Turn]], shape: ClusterShape, blocks: int, block_size: int) -> dict:
    """The placement simulator on the same requests: the oracle, and its own ``prefix_aware`` for contrast."""
    profile = scaled_profile(shape.time_scale)
    tokens_per_s = 1000.0 / profile["prefill_ms_per_token"]
    trace = [TraceRequest(at, turn.prompt) for at, turn in requests]
    figures = {}
    for policy in ("oracle", "prefix_aware"):
        result = simulate(trace, policy, workers=shape.prefill_workers, capacity_blocks=blocks,
                          block_size=block_size, tokens_per_s=tokens_per_s)  # fmt: skip
        figures[policy] = {"hit_rate": result.hit_rate, "prefill_imbalance": result.load_imbalance}
    return figures


def run_placement(config: PdserveConfig, trace: TenantTrace, shape: ClusterShape, vocab_size: int) -> dict:
    block_size = config.engine.block_size
    blocks = kv_blocks(trace, shape, block_size)
    requests = trace.requests(vocab_size)
    with tempfile.TemporaryDirectory(prefix="pdserve-placement-") as folder:
        overrides = simulated_cluster(Path(folder), trace, shape, block_size)
        live = {}
        for policy in POLICIES:
            began = time.perf_counter()
            with Footprint() as footprint:  # the whole service, its start and stop included
                records, wall = with_service(
                    config, {**overrides, "router.placement.policy": policy},
                    lambda service: asyncio.run(replay(service.grpc_address, requests)),
                )  # fmt: skip
            live[policy] = {**policy_figures(records, wall, shape), "run_s": time.perf_counter() - began,
                            "footprint": footprint.summary()}  # fmt: skip
    simulated = oracle_figures(requests, shape, blocks, block_size)
    aware, robin, scored = live["prefix_aware"], live["round_robin"], live["weighted_scores"]
    return {
        "ttft_p50_round_robin_vs_prefix_aware": robin["ttft_p50_ms"] / max(aware["ttft_p50_ms"], 1e-9),
        "hit_rate_vs_oracle": aware["hit_rate"] / max(simulated["oracle"]["hit_rate"], 1e-9),
        "hit_rate_vs_round_robin": aware["hit_rate"] / max(robin["hit_rate"], 1e-9),
        "load_imbalance": max(aware["prefill_imbalance"], aware["decode_imbalance"]),
        "hit_rate_prefix_aware_vs_weighted_scores": aware["hit_rate"] / max(scored["hit_rate"], 1e-9),
        "ttft_p50_weighted_scores_vs_prefix_aware": scored["ttft_p50_ms"] / max(aware["ttft_p50_ms"], 1e-9),
        "live": live,
        "simulator": simulated,
        "settings": {
            "trace": asdict(trace),
            "shape": asdict(shape),
            "kv_blocks_per_worker": blocks,
            "block_size": block_size,
            "requests": len(requests),
            "mean_prompt_tokens": statistics.fmean(len(t.prompt) for _, t in requests),
        },  # fmt: skip
    }


def write(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "placement_live.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
