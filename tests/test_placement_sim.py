"""The placement simulator drives the real policies and the real index."""

from __future__ import annotations

import pytest

from bench.placement_sim import SharedPrefixTrace, SimWorker, simulate
from engine.block_hash import hash_chain
from engine.cache_events import BlocksRemoved, BlocksStored
from router.index import make_index

TRACE = SharedPrefixTrace(system_prompts=30, min_prompt_tokens=256, max_prompt_tokens=512, requests=400, rate_per_s=50)


def test_the_trace_is_reproducible_from_its_seed():
    assert [r.token_ids for r in TRACE] == [r.token_ids for r in TRACE]
    assert [r.token_ids for r in TRACE] != [r.token_ids for r in SharedPrefixTrace(**{**TRACE.__dict__, "seed": 1})]


def test_an_lru_worker_emits_stored_then_removed_events():
    worker = SimWorker("w", capacity_blocks=3, tokens_per_s=1000)
    chain = hash_chain("m", list(range(64)), 16)
    cached, events = worker.serve(chain, 64, 16, now_s=0.0)
    assert cached == 0
    assert events == [BlocksStored(chain, None), BlocksRemoved([chain[0]])]
    assert worker.queued_tokens(0.0) == 64


@pytest.fixture(params=["memory", "redis"])
def index(request, tmp_path):
    if request.param == "memory":
        return make_index(None, "sim")
    server = request.getfixturevalue("redis_server")
    # Placement is under test, not an outage: a call held up past the service's 0.5 s (a busy 2-core CI
    # machine) would count as one, and the index would place on load alone until Redis answered again.
    return make_index(server.url, "sim", timeout_s=10)


def test_prefix_aware_beats_round_robin_and_stays_near_the_oracle(index):
    capacity = TRACE.working_set_tokens() // 16 // 8
    requests = list(TRACE)
    results = {
        policy: simulate(
            requests, policy, workers=4, capacity_blocks=capacity, tokens_per_s=20_000, index=make_index(None, "sim")
        )
        for policy in ("round_robin", "oracle")
    }
    aware = simulate(requests, "prefix_aware", workers=4, capacity_blocks=capacity, tokens_per_s=20_000, index=index)
    assert index.health().outages == 0, "an index call timed out: placement fell back to load alone"
    assert aware.hit_rate > 1.5 * results["round_robin"].hit_rate
    assert aware.hit_rate > 0.85 * results["oracle"].hit_rate
    assert aware.load_imbalance <= 1.5
    assert sum(aware.requests_per_worker) == TRACE.requests


def test_routers_sharing_one_index_keep_the_hit_rate_of_one_router_and_private_indexes_lose_it():
    capacity = TRACE.working_set_tokens() // 16 // 8
    requests = list(TRACE)
    run = dict(workers=4, capacity_blocks=capacity, tokens_per_s=20_000)
    single = simulate(requests, "prefix_aware", **run)
    shared = simulate(requests, "prefix_aware", routers=4, view_delay_s=0.01, **run)
    private = simulate(requests, "prefix_aware", routers=4, shared_index=False, **run)
    assert shared.hit_rate >= 0.95 * single.hit_rate and shared.load_imbalance <= 1.5
    assert private.hit_rate < 0.9 * single.hit_rate
