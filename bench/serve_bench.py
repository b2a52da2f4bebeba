"""``pdserve bench serve``: open-loop Poisson load against the running service, and two comparisons.

1. Overhead: TTFT of 1k-token prompts through the whole service (HTTP, router,
   prefill worker, KV transfer, decode worker) over TTFT of the same engine
   called in-process, both on one core, in this invocation.
2. Placement: the ``shared-prefix`` workload (groups of requests sharing a long
   system prompt, more groups than one replica's KV holds) against several
   co-located replicas, ``prefix_aware`` vs ``round_robin``, same arrivals.
Every run reports TTFT / TPOT / ITL / end-to-end p50/p90/p99, throughput and
the prefix-hit rate (from the router's metrics); the ``random`` workload runs
over HTTP (SSE) and over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from bench.report import report
from pdserve.config import PdserveConfig
from pdserve.local_redis import free_port
from pdserve_pb.v1 import generate_pb2 as pb
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc

OVERHEAD_PROMPT = 1024


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]


def random_workload(rng: random.Random, vocab: int, n: int, length: int) -> Workload:
    return Workload("random", [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)])


def shared_prefix_workload(rng: random.Random, vocab: int, n: int, groups: int, prefix: int, suffix: int) -> Workload:
    """``groups`` long system prompts; each request is one of them plus its own question."""
    heads = [[rng.randrange(2, vocab) for _ in range(prefix)] for _ in range(groups)]
    order = [rng.randrange(groups) for _ in range(n)]
    return Workload("shared-prefix", [heads[g] + [rng.randrange(2, vocab) for _ in range(suffix)] for g in order])


async def run_load(
    service, workload: Workload, rate: float, max_tokens: int, seed: int, api: str = "http"
) -> tuple[list[Sample], float]:
    """Send every prompt at Poisson arrival times (open loop) over ``api``; return the samples and the wall time."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=service.http_url, timeout=300) as client:
        async with grpc.aio.insecure_channel(service.grpc_address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            start = time.perf_counter()
            tasks = []
            for ids in workload.prompts:
                one = _one(client, ids, max_tokens) if api == "http" else _one_grpc(stub, ids, max_tokens)
                tasks.append(asyncio.create_task(one))
                await asyncio.sleep(rng.expovariate(rate))
            samples = await asyncio.gather(*tasks)
            return samples, time.perf_counter() - start


async def _one_grpc(stub, ids: list[int], max_tokens: int) -> Sample:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling)
    start = time.perf_counter()
    first = last = None
    sample = Sample(0.0, 0.0)
    async for reply in stub.Generate(request, timeout=300):
        if not reply.token_ids:
            continue
        now = time.perf_counter()
        if first is None:
            first = now
        else:
            sample.itl_s.extend([(now - last) / len(reply.token_ids)] * len(reply.token_ids))
        last = now
        sample.tokens += len(reply.token_ids)
    sample.ttft_s = (first or time.perf_counter()) - start
    sample.e2e_s = time.perf_counter() - start
    return sample


async def _one(client: httpx.AsyncClient, ids: list[int], max_tokens: int) -> Sample:
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    first = last = None
    sample = Sample(0.0, 0.0)
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if not json.loads(line[6:])["choices"][0]["text"]:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                sample.itl_s.append(now - last)
            last = now
            sample.tokens += 1
    sample.ttft_s = (first or time.perf_counter()) - start
    sample.e2e_s = time.perf_counter() - start
    return sample


def summarize(samples: list[Sample], wall_s: float) -> dict:
    def pct(values: list[float]) -> dict:
        ordered = sorted(values) or [0.0]
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return {"p50_ms": 1000 * pick(0.5), "p90_ms": 1000 * pick(0.9), "p99_ms": 1000 * pick(0.99)}

    tpot = [(s.e2e_s - s.ttft_s) / (s.tokens - 1) for s in samples if s.tokens > 1]
    return {
        "ttft": pct([s.ttft_s for s in samples]),
        "tpot": pct(tpot),
        "itl": pct([gap for s in samples for gap in s.itl_s]),
        "e2e": pct([s.e2e_s for s in samples]),
        "requests": len(samples),
        "output_tokens_per_s": sum(s.tokens for s in samples) / wall_s,
        "requests_per_s": len(samples) / wall_s,
    }


def run_serve_bench(
    config: PdserveConfig,
    requests: int,
    rate: float,
    max_tokens: int,
    json_path: Path | None,
    replicas: int = 4,
    repeats: int = 3,
) -> dict:
    from pdserve.app import model_info

    vocab = model_info(config.engine).vocab_size
    rng = random.Random(0)
    results: dict = {"model": str(config.engine.model), "rate_rps": rate, "max_tokens": max_tokens,
                     "placement_replicas": replicas}  # fmt: skip

    overhead_prompts = [[rng.randrange(2, vocab) for _ in range(OVERHEAD_PROMPT)] for _ in range(8)]
    engine_ttft = _in_process_ttft(config, overhead_prompts)
    randoms = random_workload(rng, vocab, requests, 512)
    disaggregated = _with_service(config, {"service.mode": "disaggregated"}, lambda service, client: {
        "ttft_1k_ms": 1000 * _sequential_ttft(service.http_url, [
            [rng.randrange(2, vocab) for _ in range(OVERHEAD_PROMPT)] for _ in range(8)]),
        "random": _load(service, client, randoms, rate, max_tokens),
        "random_grpc": _load(service, client, random_workload(rng, vocab, requests, 512), rate, max_tokens, "grpc"),
    })  # fmt: skip
    results["engine_in_process_ttft_1k_ms"] = 1000 * engine_ttft
    results["disaggregated"] = disaggregated
    results["overhead_vs_ttft"] = disaggregated["ttft_1k_ms"] / (1000 * engine_ttft) - 1

    shared = shared_prefix_workload(rng, vocab, 2 * requests, groups=4 * replicas, prefix=1024, suffix=64)
    # Each replica's KV holds five of the prefixes (8 blocks each): with affinity each holds its own four;
    # round-robin shows every replica every prefix, and LRU keeps about a third of them. The replicas share
    # one core, one thread each (several multi-threaded engines on two cores would spin against each other).
    placement = {"service.mode": "colocated", "service.decode.num_replicas": replicas, "service.decode.cpu_cores": "0",
                 "engine.num_kv_blocks": 40, "engine.block_size": 128, "engine.max_model_len": 2048}  # fmt: skip
    ratios = []
    for round_no in range(repeats):  # each round: both policies from a cold start, on the same arrivals
        for policy in ("prefix_aware", "round_robin"):
            overrides = {**placement, "router.placement.policy": policy}
            run = _with_service(config, overrides, lambda service, client, seed=round_no: {
                "shared-prefix": _load(service, client, shared, rate, max_tokens, seed=seed)})  # fmt: skip
            results.setdefault(f"{policy}_rounds", []).append(run)
        aware, rr = (
            results[f"{p}_rounds"][-1]["shared-prefix"]["ttft"]["p50_ms"] for p in ("prefix_aware", "round_robin")
        )
        ratios.append(rr / aware)
    middle = ratios.index(statistics.median_low(ratios))  # the round whose ratio is the median: its tables below
    for policy in ("prefix_aware", "round_robin"):
        results[policy] = results[f"{policy}_rounds"][middle]
    results["prefix_aware_vs_round_robin_ttft_p50"] = statistics.median(ratios)
    results["prefix_aware_vs_round_robin_ttft_p50_rounds"] = ratios

    rows = [
        ("router+transfer overhead / TTFT (1k)", f"{results['overhead_vs_ttft']:.3f}", "<= 0.10"),
        ("TTFT 1k, in-process engine (ms)", f"{1000 * engine_ttft:.1f}", ""),
        ("TTFT 1k, through the service (ms)", f"{disaggregated['ttft_1k_ms']:.1f}", ""),
        (
            "round_robin / prefix_aware p50 TTFT (median)",
            f"{results['prefix_aware_vs_round_robin_ttft_p50']:.2f}",
            ">= 3",
        ),
        ("  ... per round", " ".join(f"{r:.2f}" for r in ratios), ""),
    ]
    for label, run in (("random (disagg.)", disaggregated["random"]),
                       ("random (disagg., gRPC)", disaggregated["random_grpc"]),
                       ("shared, prefix_aware", results["prefix_aware"]["shared-prefix"]),
                       ("shared, round_robin", results["round_robin"]["shared-prefix"])):  # fmt: skip
        for metric in ("ttft", "tpot", "itl", "e2e"):
            p = run[metric]
            rows.append(
                (f"{label} {metric} p50/p90/p99 ms", f"{p['p50_ms']:.0f}/{p['p90_ms']:.0f}/{p['p99_ms']:.0f}", "")
            )
        rows.append((f"{label} output tok/s", f"{run['output_tokens_per_s']:.0f}", ""))
        rows.append((f"{label} prefix-hit rate", f"{run['prefix_hit_rate']:.2f}", ""))
    report(rows, results, json_path)
    return results


def _load(service, client, workload: Workload, rate: float, max_tokens: int, api: str = "http", seed: int = 1) -> dict:
    hits_before, prompt_before = client.hit_counts()
    samples, wall = asyncio.run(run_load(service, workload, rate, max_tokens, seed=seed, api=api))
    hits, prompts = client.hit_counts()
    summary = summarize(samples, wall)
    summary["prefix_hit_rate"] = (hits - hits_before) / max(prompts - prompt_before, 1)
    return summary


def _sequential_ttft(url: str, prompts: list[list[int]]) -> float:
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return [(await _one(client, ids, 2)).ttft_s for ids in prompts]

    return statistics.median(asyncio.run(run()))


def _in_process_ttft(config: PdserveConfig, prompts: list[list[int]]) -> float:
    """One engine in its own process, on one core as each worker is (bound, one thread): time to its one token."""
    from bench.engine_process import EnginePeer

    peer = EnginePeer(config.engine.model_copy(update={"cpu_cores": "0"}), {"OMP_NUM_THREADS": "1"})
    try:
        peer.generate("warmup", prompts[0][::-1], 1)
        times = []
        for i, ids in enumerate(prompts):
            start = time.perf_counter()
            peer.generate(f"ttft-{i}", ids, 1)
            times.append(time.perf_counter() - start)
    finally:
        peer.stop()
    return statistics.median(times)


class _HitCounter:
    def __init__(self, url: str):
        self._url = url

    def hit_counts(self) -> tuple[float, float]:
        text = httpx.get(self._url + "/metrics", timeout=30).text
        return _sample_sum(text, "pdserve:prefix_cache_hit_tokens_total"), _sample_sum(
            text, "pdserve:prompt_tokens_total"
        )


def _sample_sum(text: str, name: str) -> float:
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name + "{"))


def _with_service(config: PdserveConfig, overrides: dict, body):
    from pdserve.config import load_config
    from pdserve.up import start

    settings = {"service.http_port": free_port(), "service.grpc_port": free_port(), **overrides}
    merged = load_config(data=config.model_dump(mode="json"), overrides=settings)
    service = start(merged)
    try:
        _sequential_ttft(service.http_url, [[7] * 64])  # warm-up: the first request pays for lazy imports
        return body(service, _HitCounter(service.http_url))
    finally:
        service.stop()


def run_router_replicas_bench(config: PdserveConfig, routers: int, requests: int, rate: float, repeats: int) -> dict:
    """Prefix-hit rate of ``shared-prefix`` through ``routers`` router replicas over one Redis index, vs one router.

    The placement comparison's setup (co-located replicas on one core, KV for
    five of the prefixes each), ``prefix_aware``, Redis for both runs; each
    round runs both from a cold start on the same arrivals. Hit rates are the
    requests' own cached-token counts (``usage``), so no router's metrics are missed.
    """
    from pdserve.app import model_info

    vocab = model_info(config.engine).vocab_size
    replicas = 4
    shared = shared_prefix_workload(random.Random(0), vocab, requests, groups=4 * replicas, prefix=1024, suffix=64)
    setup = {"service.mode": "colocated", "service.decode.num_replicas": replicas, "service.decode.cpu_cores": "0",
             "engine.num_kv_blocks": 40, "engine.block_size": 128, "engine.max_model_len": 2048,
             "router.index.redis_url": "local"}  # fmt: skip
    runs: dict[int, list[dict]] = {1: [], routers: []}
    for round_no in range(repeats):
        for count in runs:
            overrides = {**setup, "service.router.num_replicas": count}
            run = _with_service(config, overrides, lambda service, _, seed=round_no:
                                asyncio.run(_hit_rate_load(service.http_url, shared, rate, seed)))  # fmt: skip
            runs[count].append(run)
    ratios = [many["hit_rate"] / one["hit_rate"] for one, many in zip(runs[1], runs[routers], strict=True)]
    return {
        "service_multi_router_hit_vs_single": statistics.median(ratios),
        "service_multi_router_hit_vs_single_rounds": ratios,
        "service_routers": routers,
        "service_single_router_rounds": runs[1],
        "service_multi_router_rounds": runs[routers],
    }


async def _hit_rate_load(url: str, workload: Workload, rate: float, seed: int) -> dict:
    """Open-loop load, non-streaming: the hit rate from each reply's usage, and which router served it."""
    rng = random.Random(seed)

    async def one(client: httpx.AsyncClient, ids: list[int]) -> dict:
        reply = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 2, "temperature": 0})
        reply.raise_for_status()
        return reply.json()

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tasks = []
        for ids in workload.prompts:
            tasks.append(asyncio.create_task(one(client, ids)))
            await asyncio.sleep(rng.expovariate(rate))
        bodies = await asyncio.gather(*tasks)
    cached = sum(b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies)
    prompt = sum(b["usage"]["prompt_tokens"] for b in bodies)
    served: dict[str, int] = {}
    for body in bodies:
        router = body["pdserve"]["timing"]["router"]
        served[router] = served.get(router, 0) + 1
    return {"hit_rate": cached / prompt, "requests_per_router": sorted(served.values())}
