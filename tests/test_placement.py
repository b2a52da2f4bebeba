"""Placement policies over the real in-memory index, and conditional disaggregation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.block_hash import hash_chain
from engine.cache_events import BlocksStored
from router.index import Claim, MemoryPrefixIndex, WorkerInfo, WorkerLoad, make_index
from router.placement import NoWorkerError, PlacementConfig, Placer

MODEL, BLOCK = "tiny", 16
PROMPT = list(range(2, 2 + 64 * BLOCK))  # 1,024 tokens, 64 blocks
CHAIN = hash_chain(MODEL, PROMPT, BLOCK)


class Cluster:
    def __init__(self, policy: str = "prefix_aware", index=None, **config):
        self.index = index if index is not None else MemoryPrefixIndex()
        self.placer = Placer(self.index, PlacementConfig(policy=policy, **config), MODEL, BLOCK)

    def worker(self, worker_id, role, blocks=0, block_size=BLOCK, **load):
        self.index.heartbeat(WorkerInfo(worker_id, role, 1, block_size, WorkerLoad(**load)), 30)
        if blocks:
            self.index.apply_events(worker_id, 1, [BlocksStored(CHAIN[:blocks], None)])
        return self

    def place(self, tokens=PROMPT):
        return self.placer.place(tokens)

    def router(self, **config):
        """Another router over the same index, with its own policy state."""
        return Placer(self.index, PlacementConfig(**config), MODEL, BLOCK)


def test_prefix_aware_sends_the_prefill_to_the_worker_holding_the_prefix():
    cluster = Cluster().worker("p0", "prefill").worker("p1", "prefill", blocks=40).worker("d0", "decode")
    placement = cluster.place()
    assert placement.prefill_worker == "p1" and placement.prefill_cached_tokens == 40 * BLOCK
    assert placement.outcome == "disaggregated"


def test_prefix_aware_prefers_the_decode_worker_that_needs_fewer_blocks_shipped():
    cluster = Cluster().worker("p0", "prefill").worker("d0", "decode").worker("d1", "decode", blocks=30)
    placement = cluster.place()
    assert placement.decode_worker == "d1" and placement.decode_cached_tokens == 30 * BLOCK


def test_prefix_aware_spills_when_the_holder_queue_costs_more_than_the_prefix_saves():
    cluster = Cluster().worker("p0", "prefill", blocks=32, queued_prefill_tokens=4000).worker("p1", "prefill")
    cluster.worker("d0", "decode")
    assert cluster.place().prefill_worker == "p1"


def test_prefill_tokens_placed_since_the_last_heartbeat_count_as_queued():
    cluster = Cluster().worker("p0", "prefill", blocks=32).worker("p1", "prefill").worker("d0", "decode")
    cluster.index.reserve([Claim("earlier", "p0", 4000)], ttl_s=30)
    assert cluster.place().prefill_worker == "p1"


def test_one_routers_hot_prefix_goes_to_its_holder_up_to_the_bound_on_recent_placements():
    cluster = Cluster(local_prefill_max_uncached_tokens=0).worker("p0", "prefill", blocks=64)
    cluster.worker("p1", "prefill").worker("d0", "decode")
    chosen = [cluster.place().prefill_worker for _ in range(20)]
    assert chosen[:2] == ["p0", "p0"]  # a fresh router does not spread the first requests
    assert chosen.count("p0") == 13  # ceil(1.3 × 20 / 2): the rest copies the prefix to p1


@pytest.fixture(params=["memory", "redis"])
def shared_index(request):
    if request.param == "memory":
        return MemoryPrefixIndex()
    return make_index(request.getfixturevalue("redis_server").url, MODEL)


def test_routers_sharing_the_index_spread_a_burst_on_one_prefix_by_the_load_bound(shared_index):
    cluster = Cluster(index=shared_index).worker("d0", "decode")
    for worker_id in ("p0", "p1", "p2", "p3"):
        cluster.worker(worker_id, "prefill", blocks=64 if worker_id == "p0" else 0)
    routers = [cluster.router(local_prefill_max_uncached_tokens=0) for _ in range(8)]
    chosen = []
    for number, router in enumerate(routers):  # each router's first request: its own window is empty
        placement = router.place(PROMPT)
        cluster.index.reserve([Claim(str(number), placement.prefill_worker, 1)], ttl_s=30)
        chosen.append(placement.prefill_worker)
    # ceil(1.3 × 8 / 4) = 3 in flight at most on the holder; without the shared count all 8 would land there.
    assert chosen.count("p0") == 3 and len(set(chosen)) == 4


def test_prefix_aware_weighs_decode_load_against_cached_tokens():
    cluster = Cluster().worker("p0", "prefill").worker("d0", "decode", blocks=60, running_seqs=60, kv_used_fraction=0.9)
    cluster.worker("d1", "decode")
    assert cluster.place().decode_worker == "d1"


LONG = list(range(5000, 5000 + 2048))  # cached nowhere
POOL = 6144  # a decode worker's KV pool, in tokens: three of LONG do not fit


def test_a_burst_of_long_prompts_spreads_over_the_decode_pools_by_the_kv_placed_since_their_heartbeats():
    cluster = Cluster().worker("p0", "prefill")
    for worker_id in ("d0", "d1", "d2"):
        cluster.worker(worker_id, "decode", kv_pool_tokens=POOL)
    cluster.worker("d3", "decode", running_seqs=1, kv_used_fraction=len(LONG) / POOL, kv_pool_tokens=POOL)
    for number in range(7):  # the burst arrives within one heartbeat: only the index's claims show it
        placement = cluster.place(LONG)
        cluster.index.reserve([Claim(str(number), placement.decode_worker, kv_tokens=len(LONG))], ttl_s=30)
    sequences = {w.worker_id: w.in_flight.requests + w.load.running_seqs for w in cluster.index.live_workers()}
    assert sequences == {"p0": 0, "d0": 2, "d1": 2, "d2": 2, "d3": 2}  # none has a third waiting for blocks


def test_kv_placed_before_a_decode_workers_heartbeat_that_it_has_not_been_handed_yet_still_counts():
    cluster = Cluster().worker("p0", "prefill").worker("d0", "decode", kv_pool_tokens=POOL)
    cluster.index.reserve([Claim("waiting-for-its-prefill", "d0", kv_tokens=4000)], ttl_s=30)
    cluster.worker("d0", "decode", kv_pool_tokens=POOL)  # a beat after the placement: its pool still empty
    cluster.worker("d1", "decode", running_seqs=1, kv_used_fraction=0.3, kv_pool_tokens=POOL)
    assert cluster.place(LONG).decode_worker == "d1"


def test_round_robin_rotates_whatever_the_cache_holds():
    cluster = Cluster("round_robin").worker("p0", "prefill", blocks=64).worker("p1", "prefill")
    cluster.worker("d0", "decode").worker("d1", "decode")
    placements = [cluster.place() for _ in range(4)]
    assert [p.prefill_worker for p in placements] == ["p0", "p1", "p0", "p1"]
    assert [p.decode_worker for p in placements] == ["d0", "d1", "d0", "d1"]


def test_least_loaded_takes_the_emptiest_queue_and_the_lightest_decoder():
    cluster = Cluster("least_loaded").worker("p0", "prefill", blocks=64, queued_prefill_tokens=10)
    cluster.worker("p1", "prefill", queued_prefill_tokens=2)
    cluster.worker("d0", "decode", running_seqs=4).worker("d1", "decode", running_seqs=1)
    placement = cluster.place()
    assert (placement.prefill_worker, placement.decode_worker) == ("p1", "d1")


def test_weighted_scores_takes_the_holder_until_its_queue_outweighs_its_prefix_as_llm_d_scores():
    cluster = Cluster("weighted_scores").worker("p0", "prefill", blocks=48, queued_prefill_tokens=100)
    cluster.worker("p1", "prefill", queued_prefill_tokens=0).worker("d0", "decode")
    assert cluster.place().prefill_worker == "p0"  # prefix 3 × 0.75 + queue 2 × 0 = 2.25 > 0 + 2 × 1
    cluster = Cluster("weighted_scores").worker("p0", "prefill", blocks=16, queued_prefill_tokens=100)
    cluster.worker("p1", "prefill", queued_prefill_tokens=0).worker("d0", "decode")
    assert cluster.place().prefill_worker == "p1"  # 3 × 0.25 = 0.75 < 2


def test_weighted_scores_kv_weight_steers_decode_away_from_a_full_pool():
    def decode_choice(**weights) -> str:
        cluster = Cluster("weighted_scores", **weights).worker("p0", "prefill")
        cluster.worker("d0", "decode", running_seqs=1, kv_used_fraction=0.95)
        cluster.worker("d1", "decode", running_seqs=2, kv_used_fraction=0.1)
        return cluster.place().decode_worker

    assert decode_choice() == "d0"  # the shorter queue, KV not weighed
    assert decode_choice(kv_score_weight=4.0) == "d1"


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "prefix_aware", "weighted_scores"])
def test_a_short_uncached_part_is_prefilled_on_the_decode_worker(policy):
    cluster = Cluster(policy, local_prefill_max_uncached_tokens=256).worker("p0", "prefill").worker("d0", "decode")
    short = cluster.place(PROMPT[:200])
    assert (short.prefill_worker, short.outcome, short.reason) == (None, "local_prefill", "short_uncached")
    assert cluster.place().outcome == "disaggregated"


def test_a_decode_worker_holding_most_of_the_prompt_prefills_the_rest_itself():
    cluster = Cluster(local_prefill_max_uncached_tokens=256).worker("p0", "prefill").worker("d0", "decode", blocks=60)
    placement = cluster.place()
    assert placement.outcome == "local_prefill" and placement.decode_cached_tokens == 60 * BLOCK


def test_a_backlogged_prefill_pool_sends_prefills_to_an_idle_decode_worker():
    cluster = Cluster(prefill_queue_limit_tokens=1000).worker("p0", "prefill", queued_prefill_tokens=5000)
    cluster.worker("p1", "prefill", queued_prefill_tokens=1200).worker("d0", "decode")
    assert cluster.place().reason == "prefill_saturated"


def test_a_prefill_pool_under_its_queue_limit_keeps_its_prompts():
    cluster = Cluster(prefill_queue_limit_tokens=1000).worker("p0", "prefill", queued_prefill_tokens=5000)
    cluster.worker("p1", "prefill", queued_prefill_tokens=900).worker("d0", "decode")
    assert cluster.place().outcome == "disaggregated"


def test_a_decode_worker_with_its_own_prompts_queued_leaves_a_backlogged_prefill_pool_the_prompt():
    cluster = Cluster(prefill_queue_limit_tokens=1000).worker("p0", "prefill", queued_prefill_tokens=1200)
    cluster.worker("d0", "decode", queued_prefill_tokens=300)  # 300 + 1,024 to compute: later than 1,200 + 1,024
    assert cluster.place().outcome == "local_prefill"
    cluster.worker("d0", "decode", queued_prefill_tokens=2000)
    assert cluster.place().outcome == "disaggregated"


def placed(cluster: Cluster, worker_id: str, tokens: int) -> Cluster:
    """A prompt of ``tokens`` a router placed on ``worker_id`` and has not seen finish."""
    cluster.index.reserve([Claim(f"earlier-{worker_id}-{tokens}", worker_id, tokens)], ttl_s=30)
    return cluster


def holds(cluster: Cluster, held_tokens: int = 0) -> bool:
    live, cached = cluster.index.match(CHAIN)
    return cluster.placer.holds_for_prefill_room(len(PROMPT), live, cached, held_tokens)


def test_a_prompt_is_held_while_every_prefill_worker_has_the_dispatch_limit_placed_on_it():
    cluster = Cluster(prefill_dispatch_limit_tokens=2000).worker("p0", "prefill").worker("p1", "prefill")
    placed(placed(cluster.worker("d0", "decode"), "p0", 2500), "p1", 2000)
    assert holds(cluster)
    cluster.index.release([Claim("earlier-p1-2000", "p1", 2000)])  # its prefill ended
    assert not holds(cluster)


def test_the_dispatch_limit_counts_placements_not_the_heartbeats_lagging_queue():
    cluster = Cluster(prefill_dispatch_limit_tokens=2000).worker("p0", "prefill", queued_prefill_tokens=9000)
    assert not holds(cluster.worker("d0", "decode"))  # its last beat, before the prompts it has finished since
    assert holds(placed(cluster, "p0", 2048))


def test_with_a_dispatch_limit_a_prompt_goes_only_to_a_worker_under_it_whatever_else_it_holds():
    cluster = Cluster(prefill_dispatch_limit_tokens=2000).worker("p0", "prefill", blocks=60).worker("p1", "prefill")
    placed(placed(cluster.worker("d0", "decode"), "p0", 2000), "p1", 1500)
    assert cluster.place().prefill_worker == "p1"  # p0 holds the prefix but is at the limit


def test_without_a_dispatch_limit_no_prompt_is_held():
    cluster = Cluster().worker("p0", "prefill").worker("d0", "decode")
    assert not holds(placed(cluster, "p0", 60_000))


def test_a_prompt_a_decode_worker_prefills_itself_is_never_held():
    cluster = Cluster(prefill_dispatch_limit_tokens=100).worker("p0", "prefill")
    cluster.worker("d0", "decode", blocks=60)  # 64 of the prompt's 1,024 tokens uncached: short
    assert not holds(placed(cluster, "p0", 5000))


def test_prompts_held_past_the_queue_limit_go_to_conditional_disaggregation_instead():
    cluster = Cluster(prefill_dispatch_limit_tokens=2000, prefill_queue_limit_tokens=10_000)
    cluster.worker("p0", "prefill", queued_prefill_tokens=3000).worker("p1", "prefill", queued_prefill_tokens=3000)
    placed(placed(cluster.worker("d0", "decode"), "p0", 3000), "p1", 3000)
    assert holds(cluster, held_tokens=14_000)  # 3,000 + 7,000 each: under the queue limit
    assert not holds(cluster, held_tokens=16_000)
    live, cached = cluster.index.match(CHAIN)
    assert cluster.placer.place_matched(len(PROMPT), live, cached, held_tokens=16_000).reason == "prefill_saturated"


def test_prompts_placed_on_a_decode_worker_count_in_its_queue_before_its_heartbeat():
    cluster = Cluster(prefill_queue_limit_tokens=1000).worker("p0", "prefill", queued_prefill_tokens=1500)
    cluster.worker("d0", "decode")
    cluster.index.reserve([Claim("earlier", "d0", 2000)], ttl_s=30)
    assert cluster.place().outcome == "disaggregated"


def test_no_prefill_worker_means_local_prefill():
    assert Cluster().worker("d0", "decode").place().reason == "no_prefill_worker"


def test_no_decode_worker_is_an_error():
    with pytest.raises(NoWorkerError, match="no live decode worker"):
        Cluster().worker("p0", "prefill").place()


def test_the_last_prompt_token_is_never_counted_as_cached():
    cluster = Cluster(local_prefill_max_uncached_tokens=0).worker("p0", "prefill", blocks=64).worker("d0", "decode")
    assert cluster.place().prefill_cached_tokens == len(PROMPT) - 1


def test_a_worker_with_another_block_size_shares_no_cache():
    cluster = Cluster().worker("p0", "prefill", blocks=64, block_size=32).worker("p1", "prefill", blocks=8)
    cluster.worker("d0", "decode")
    placement = cluster.place()
    assert placement.prefill_worker == "p1" and placement.prefill_cached_tokens == 8 * BLOCK


@pytest.mark.parametrize(
    "changes,field",
    [({"policy": "random"}, "policy"), ({"prefill_queue_weight": -1}, "prefill_queue_weight"), ({"bogus": 1}, "bogus")],
)
def test_bad_placement_config_names_the_field(changes, field):
    with pytest.raises(ValidationError, match=field):
        PlacementConfig(**changes)
