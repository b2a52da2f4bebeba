"""The router tier measured in the service (#22 item 5): several router replicas over one Redis index vs one.

The cluster and trace of ``bench/placement_live.py`` (8 prefill + 16 decode simulated workers, the
multi-tenant trace, ``prefix_aware``), with the index in Redis for every run, so the runs differ only in
how many routers place. Requests go over many TCP connections, each of which reaches one router replica;
each router sees the others' placements only through the workers' cache events and heartbeats in Redis,
as on a cluster. Three runs, each on a fresh service:

- ``single``: one router replica;
- ``multi``: ``routers`` replicas;
- ``multi_router_killed``: ``routers`` replicas, one SIGKILLed halfway through the arrivals. Its in-flight
  requests fail (their streams lived in it); what is counted is that nothing sent later fails, and the hit
  rate of the run.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.load import Record
from bench.placement_live import ClusterShape, TenantTrace, policy_figures, replay, simulated_cluster
from bench.running import with_service
from pdserve.config import PdserveConfig

CONNECTIONS = 32  # TCP connections the client spreads its requests over: each lands on one router replica
SETTLE_S = 5.0  # after the kill, time for the connections to the dead router to find a live one


def tier_runs(routers: int) -> tuple[tuple[str, int, bool], ...]:
    """(label, router replicas, one killed mid-run)."""
    return ("single", 1, False), ("multi", routers, False), ("multi_router_killed", routers, True)


def router_replicas(service) -> list[str]:
    """The live router replicas' actor names (``SERVE_REPLICA::<app>#Router#<id>``)."""
    import ray

    prefix = f"SERVE_REPLICA::{service.config.service.app_name}#Router#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


async def kill_a_router(service, after_s: float, killed: dict) -> None:
    """SIGKILL (``ray.kill``) the first router replica ``after_s`` into the run; note which and when."""
    import ray

    await asyncio.sleep(after_s)
    victim = router_replicas(service)[0]
    killed["at_s"] = after_s
    killed["router"] = victim.rsplit("#", 1)[1]
    ray.kill(ray.get_actor(victim, namespace="serve"))


def killed_run_figures(records: list[Record], killed: dict) -> dict:
    """Which requests failed, by when they were sent: in flight at the kill, or later (should be none)."""
    failed = [r for r in records if r.error]
    later = [r for r in failed if r.start_s >= killed["at_s"] + SETTLE_S]
    return {
        "killed_router": killed["router"],
        "killed_at_s": killed["at_s"],
        "errors": len(failed),
        "errors_sent_before_the_kill": sum(r.start_s < killed["at_s"] for r in failed),
        "errors_sent_after_settling": len(later),
        "error_examples": sorted({r.error[:160] for r in failed})[:3],
    }


def run_router_tier(config: PdserveConfig, trace: TenantTrace, shape: ClusterShape, vocab_size: int,
                    routers: int) -> dict:  # fmt: skip
    requests = trace.requests(vocab_size)
    with tempfile.TemporaryDirectory(prefix="pdserve-router-tier-") as folder:
        cluster = {
            **simulated_cluster(Path(folder), trace, shape, config.engine.block_size),
            "router.placement.policy": "prefix_aware", "router.index.redis_url": "local",
        }  # fmt: skip
        runs: dict[str, dict] = {}
        for label, count, kill in tier_runs(routers):
            killed: dict = {}

            def body(service, kill=kill, killed=killed):
                meanwhile = kill_a_router(service, trace.duration_s / 2, killed) if kill else None
                return asyncio.run(replay(service.grpc_address, requests, CONNECTIONS, meanwhile))

            began = time.perf_counter()
            records, wall = with_service(config, {**cluster, "service.router.num_replicas": count}, body)
            runs[label] = {
                **policy_figures(records, wall, shape),
                "requests_per_router": dict(Counter(r.router for r in records if not r.error)),
                "run_s": time.perf_counter() - began,
                **(killed_run_figures(records, killed) if kill else {}),
            }
    single, multi = runs["single"], runs["multi"]
    return {
        "live_multi_router_hit_vs_single": multi["hit_rate"] / max(single["hit_rate"], 1e-9),
        "live_multi_router_load_imbalance": max(multi["prefill_imbalance"], multi["decode_imbalance"]),
        "live_router_killed_hit_vs_single": runs["multi_router_killed"]["hit_rate"] / max(single["hit_rate"], 1e-9),
        "live_router_killed_errors_after_settling": runs["multi_router_killed"]["errors_sent_after_settling"],
        "live_routers": routers,
        "live": runs,
        "live_settings": {"connections": CONNECTIONS, "requests": len(requests), "shape": shape.__dict__},
    }
