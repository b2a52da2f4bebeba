"""Router benchmark: placement decision latency and prefix hit rate.

Decision latency: a decision is hash the prompt + one index match + the
policy, for 4,096-token prompts (block 16: 256 hashes) with 64 live workers
and 1,000,000 blocks in the index, from one router process; memory backend,
and Redis on loopback (a real redis-server started here).

Hit rate: the placement simulator on a shared-prefix trace (200 system prompts
of 1-4k tokens drawn Zipf(1.1), unique suffixes, 8 prefill workers each
caching ~10 % of the working set), for every policy and an oracle that sees
every cache. The baseline of each ratio runs in the same invocation.

Many routers: the same trace through ``routers`` prefix_aware routers that
share one index, each seeing cache events and heartbeats ``view_delay_s``
late, against one router; and, for contrast, through routers that each keep a
private index fed only by their own placements. With a service config, also
the real service: hit rate through ``routers`` router replicas over one Redis vs 1, on vLLM
(``bench/serve_bench.py``) or at cluster scale on the simulated engine (``bench/router_live.py``).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from array import array
from pathlib import Path

from bench.placement_sim import SharedPrefixTrace, simulate
from bench.report import Row, report
from engine.block_hash import hash_chain
from engine.cache_events import BlocksStored
from pdserve.config import PdserveConfig
from pdserve.local_redis import LocalRedis
from router.index import MemoryPrefixIndex, PrefixIndex, WorkerInfo, WorkerLoad
from router.index.redis_index import RedisPrefixIndex
from router.placement import PlacementConfig, Placer

MODEL, BLOCK, PROMPT_TOKENS = "bench", 16, 4096


def run_router_bench(
    workers: int = 64,
    index_blocks: int = 1_000_000,
    decisions: int = 2000,
    routers: int = 8,
    view_delay_s: float = 0.05,
    json_path: Path | None = None,
    service_config: PdserveConfig | None = None,
    service_engine: str = "vllm",
) -> dict:
    documents = _documents(index_blocks)
    results: dict = {}
    memory = _decision_latency(MemoryPrefixIndex(), documents, workers, decisions)
    results.update(memory_p50_ms=memory[0], memory_p99_ms=memory[1], memory_decisions_per_s=memory[2])
    with tempfile.TemporaryDirectory() as workdir:
        server = LocalRedis(Path(workdir)).start()
        try:
            redis_index = RedisPrefixIndex(server.url, MODEL, timeout_s=5.0)
            redis = _decision_latency(redis_index, documents, workers, decisions)
            redis_index.close()
        finally:
            server.stop()
    results.update(redis_p50_ms=redis[0], redis_p99_ms=redis[1], redis_decisions_per_s=redis[2])

    trace = SharedPrefixTrace()
    capacity = trace.working_set_tokens() // BLOCK // 10
    requests = list(trace)
    hits = {p: simulate(requests, p, capacity_blocks=capacity, tokens_per_s=10_000) for p in _SIM_POLICIES}
    many = {
        shared: simulate(
            requests, "prefix_aware", capacity_blocks=capacity, tokens_per_s=10_000,
            routers=routers, view_delay_s=view_delay_s, shared_index=shared,
        )
        for shared in (True, False)
    }  # fmt: skip
    results.update(
        multi_router_hit_vs_single=many[True].hit_rate / hits["prefix_aware"].hit_rate,
        multi_router_load_imbalance=many[True].load_imbalance,
        private_index_hit_vs_single=many[False].hit_rate / hits["prefix_aware"].hit_rate,
        routers=routers,
        view_delay_ms=1000 * view_delay_s,
        multi_router_hit_rate=many[True].hit_rate,
        private_index_hit_rate=many[False].hit_rate,
    )
    results.update(
        hit_rate_vs_oracle=hits["prefix_aware"].hit_rate / hits["oracle"].hit_rate,
        hit_rate_vs_round_robin=hits["prefix_aware"].hit_rate / hits["round_robin"].hit_rate,
        load_imbalance=hits["prefix_aware"].load_imbalance,
        hit_rates={p: r.hit_rate for p, r in hits.items()},
        load_imbalances={p: r.load_imbalance for p, r in hits.items()},
        index_blocks=index_blocks,
        workers=workers,
        prompt_tokens=PROMPT_TOKENS,
        block_size=BLOCK,
        sim_capacity_blocks_per_worker=capacity,
    )
    if service_config is not None and service_engine == "simulated":
        from bench.placement_live import ClusterShape, TenantTrace
        from bench.router_live import run_router_tier
        from pdserve.app import model_info

        vocab_size = model_info(service_config.engine).vocab_size
        results.update(run_router_tier(service_config, TenantTrace(), ClusterShape(), vocab_size, routers))
    elif service_config is not None:
        from bench.serve_bench import run_router_replicas

        results.update(run_router_replicas(service_config, routers=routers, requests=96, rate=2.0, repeats=3))
    report(_rows(results), results, json_path)
    return results


_SIM_POLICIES = ("round_robin", "least_loaded", "prefix_aware", "weighted_scores", "oracle")


def _documents(index_blocks: int) -> list[list[bytes]]:
    """Chains of 4,096-token documents, enough of them to fill the index."""
    per_doc = PROMPT_TOKENS // BLOCK
    return [hash_chain(MODEL, _document_tokens(i), BLOCK) for i in range(-(-index_blocks // per_doc))]


def _document_tokens(i: int) -> list[int]:
    return list(array("H", random.Random(i).randbytes(2 * PROMPT_TOKENS)))


def _fill(index: PrefixIndex, documents: list[list[bytes]], workers: int) -> None:
    rng = random.Random(1)
    for i in range(workers):
        index.heartbeat(WorkerInfo(f"w{i}", "prefill" if i % 2 else "decode", 1, BLOCK, WorkerLoad()), ttl_s=3600)
    per_worker: dict[int, list] = {i: [] for i in range(workers)}
    for chain in documents:
        per_worker[rng.randrange(workers)].append(BlocksStored(chain, None))
    for worker, events in per_worker.items():
        for start in range(0, len(events), 20):
            index.apply_events(f"w{worker}", 1, events[start : start + 20])


def _decision_latency(index: PrefixIndex, documents, workers: int, decisions: int) -> tuple[float, float, float]:
    _fill(index, documents, workers)
    placer = Placer(index, PlacementConfig(), MODEL, BLOCK)
    rng = random.Random(2)
    prompts = []
    for _ in range(decisions):
        # A cached document prefix of random length, then fresh tokens up to 4,096.
        shared = rng.randrange(0, PROMPT_TOKENS // BLOCK) * BLOCK
        tokens = _document_tokens(rng.randrange(len(documents)))[:shared]
        prompts.append(tokens + [rng.randrange(65536) for _ in range(PROMPT_TOKENS - shared)])
    latencies = []
    start = time.perf_counter()
    for tokens in prompts:
        t0 = time.perf_counter()
        placer.place(tokens)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    return 1000 * statistics.median(latencies), 1000 * p99, decisions / elapsed


def _rows(results: dict) -> list[Row]:
    rows = [
        ("memory_p99_ms", f"{results['memory_p99_ms']:.3f}", "<= 0.5"),
        ("  memory p50 (ms)", f"{results['memory_p50_ms']:.3f}", ""),
        ("  memory decisions/s", f"{results['memory_decisions_per_s']:.0f}", ""),
        ("redis_p99_ms", f"{results['redis_p99_ms']:.3f}", "<= 2"),
        ("  redis p50 (ms)", f"{results['redis_p50_ms']:.3f}", ""),
        ("redis_decisions_per_s", f"{results['redis_decisions_per_s']:.0f}", ">= 2000"),
        ("hit_rate_vs_oracle", f"{results['hit_rate_vs_oracle']:.3f}", ">= 0.9"),
        ("hit_rate_vs_round_robin", f"{results['hit_rate_vs_round_robin']:.2f}", ">= 3"),
        ("load_imbalance", f"{results['load_imbalance']:.2f}", "<= 1.5"),
        ("multi_router_hit_vs_single", f"{results['multi_router_hit_vs_single']:.3f}", ">= 0.95"),
        ("multi_router_load_imbalance", f"{results['multi_router_load_imbalance']:.2f}", "<= 1.5"),
        ("  private_index_hit_vs_single", f"{results['private_index_hit_vs_single']:.3f}", ""),
    ]
    if "service_multi_router_hit_vs_single" in results:
        rounds = " ".join(f"{r:.3f}" for r in results["service_multi_router_hit_vs_single_rounds"])
        rows += [
            (
                f"service: {results['service_routers']} routers / 1 hit rate",
                f"{results['service_multi_router_hit_vs_single']:.3f}",
                ">= 0.95",
            ),
            ("  ... per round", rounds, ""),
        ]
    if "live_multi_router_hit_vs_single" in results:
        killed = results["live"]["multi_router_killed"]
        rows += [
            ("live_multi_router_hit_vs_single", f"{results['live_multi_router_hit_vs_single']:.3f}", ">= 0.95"),
            ("live_multi_router_load_imbalance", f"{results['live_multi_router_load_imbalance']:.2f}", "<= 1.5"),
            ("  hit rate 1 router / N routers", f"{results['live']['single']['hit_rate']:.3f} / "
             f"{results['live']['multi']['hit_rate']:.3f}", ""),
            ("  one router killed: hit vs single", f"{results['live_router_killed_hit_vs_single']:.3f}", ""),
            ("  one router killed: errors (in flight / after)",
             f"{killed['errors']} ({killed['errors_sent_before_the_kill']} / {killed['errors_sent_after_settling']})",
             "after = 0"),
        ]  # fmt: skip
    rows += [(f"  hit rate {p}", f"{r:.3f}", "") for p, r in results["hit_rates"].items()]
    return rows
