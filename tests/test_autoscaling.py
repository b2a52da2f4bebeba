"""Each pool scales on its own load, through Serve's custom-policy hook; bad scaling config is named."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from engine.throughput import BusyRate, TokensPerRequest
from engine.types import EngineStats
from pdserve.autoscaling import (
    DECODE_TOKENS_PER_SEQ_S,
    HELD_PREFILL_TOKENS,
    KV_POOL_TOKENS,
    KV_WANTED_FRACTION,
    OUTPUT_TOKENS_MEAN,
    PREFILL_TOKENS_PER_S,
    PROMPT_TOKENS_MEAN,
    QUEUED_PREFILL_TOKENS,
    RUNNING_SEQS,
    CoordinatedPolicy,
    DecodePolicy,
    PrefillPolicy,
)
from pdserve.config import ConfigError, PoolAutoscaling, PoolCoordination, load_config


def context(
    replicas: int,
    config: AutoscalingConfig | None = None,
    name: str = "PrefillWorker",
    readings: dict[str, list[list[float]]] | None = None,
    **per_replica: list[float],
) -> AutoscalingContext:
    """What Serve hands a policy: each figure averaged per replica over the look-back window, and (``readings``)
    each replica's readings in that window, one a second."""
    ids = [f"r{i}" for i in range(replicas)]
    metrics = {metric: dict(zip(ids, values, strict=True)) for metric, values in per_replica.items()}
    raw = {metric: {rid: [TimeStampedValue(float(t), v) for t, v in enumerate(series)]
                    for rid, series in zip(ids, per_id, strict=True)}
           for metric, per_id in (readings or {}).items()}  # fmt: skip
    return AutoscalingContext(
        deployment_id=DeploymentID(name, "pdserve"), deployment_name=name, app_name="pdserve",
        current_num_replicas=replicas, target_num_replicas=replicas, running_replicas=ids, total_num_requests=0.0,
        total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics=raw, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=config.max_replicas if config else 8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=config,
    )  # fmt: skip


def test_a_queue_of_long_prompts_grows_the_prefill_pool_whatever_the_request_count():
    policy = PrefillPolicy(target_queued_prefill_tokens=4096)
    # two replicas, each with a few long prompts queued: 20k tokens wants five replicas
    assert policy(context(2, **{QUEUED_PREFILL_TOKENS: [12_000, 8_000]}))[0] == 5
    assert policy(context(2, **{QUEUED_PREFILL_TOKENS: [1_000, 500]}))[0] == 1
    assert policy(context(3, **{QUEUED_PREFILL_TOKENS: [0, 0, 0]}))[0] == 0  # Serve keeps min_replicas


def test_a_queue_still_growing_asks_for_replicas_on_its_latest_reading_not_the_windows_average():
    policy = PrefillPolicy(target_queued_prefill_tokens=2048)
    building = context(1, **{QUEUED_PREFILL_TOKENS: [2000]}, readings={QUEUED_PREFILL_TOKENS: [[0, 0, 2000, 6000]]})
    assert policy(building)[0] == 3  # 6,000 queued now, though the window averages 2,000


def test_a_queue_draining_gives_replicas_back_only_on_the_windows_average():
    policy = PrefillPolicy(target_queued_prefill_tokens=2048)
    draining = context(1, **{QUEUED_PREFILL_TOKENS: [5000]}, readings={QUEUED_PREFILL_TOKENS: [[9000, 6000, 0]]})
    assert policy(draining)[0] == 3


def test_a_queue_over_its_target_still_growing_asks_for_what_it_will_hold_once_new_replicas_serve():
    growing = context(1, **{QUEUED_PREFILL_TOKENS: [3000]}, readings={QUEUED_PREFILL_TOKENS: [[0, 2000, 4000, 6000]]})
    # 2,000 tokens a second: 6,000 now and 20,000 more over the 10 s a replica takes to serve
    assert PrefillPolicy(2048, queue_growth_horizon_s=10)(growing)[0] == 13
    assert PrefillPolicy(2048, queue_growth_horizon_s=0)(growing)[0] == 3


def test_a_queue_growing_within_its_target_asks_for_nothing_more():
    growing = context(2, **{QUEUED_PREFILL_TOKENS: [500, 500]},
                      readings={QUEUED_PREFILL_TOKENS: [[0, 500, 1000, 1500], [0, 0, 1000, 1000]]})  # fmt: skip
    assert PrefillPolicy(2048, queue_growth_horizon_s=10)(growing)[0] == 2  # 2,500 queued for two replicas


def test_a_queue_draining_is_not_projected():
    draining = context(1, **{QUEUED_PREFILL_TOKENS: [5000]}, readings={QUEUED_PREFILL_TOKENS: [[9000, 6000, 3000]]})
    assert PrefillPolicy(2048, queue_growth_horizon_s=10)(draining)[0] == 3  # the window's 5,000, as without


def test_the_decode_pool_reads_its_latest_sequences_and_kv_wanted_too():
    policy = DecodePolicy(target_running_seqs=6, target_kv_used_fraction=0.7)
    busier = {RUNNING_SEQS: [[2, 2], [3, 11]], KV_WANTED_FRACTION: [[0.1, 0.9], [0.2, 0.2]]}
    assert policy(context(2, **{RUNNING_SEQS: [2, 7], KV_WANTED_FRACTION: [0.5, 0.2]}, readings=busier))[0] == 3


def test_the_decode_pool_grows_on_running_sequences_or_on_the_kv_wanted_whichever_asks_more():
    policy = DecodePolicy(target_running_seqs=32, target_kv_used_fraction=0.7)
    long_generations = context(2, **{RUNNING_SEQS: [60, 70], KV_WANTED_FRACTION: [0.5, 0.6]})
    assert policy(long_generations)[0] == 5  # 130 sequences at 32 each
    long_contexts = context(2, **{RUNNING_SEQS: [4, 4], KV_WANTED_FRACTION: [0.95, 0.9]})
    assert policy(long_contexts)[0] == 3  # 1.85 pools' worth at 0.7 each
    assert policy(context(2, **{RUNNING_SEQS: [1, 0], KV_WANTED_FRACTION: [0.05, 0.0]}))[0] == 1


def test_a_decode_pool_too_small_for_its_sequences_asks_for_the_kv_they_want_not_the_pool_it_has():
    policy = DecodePolicy(target_running_seqs=6, target_kv_used_fraction=0.7)
    # one replica full, holding two long sequences, with three more waiting for blocks: 2.5 pools wanted
    assert policy(context(1, **{RUNNING_SEQS: [5], KV_WANTED_FRACTION: [2.5]}))[0] == 4


def test_the_kv_wanted_is_the_kv_in_use_and_as_much_again_for_each_sequence_waiting_for_blocks_as_one_holds():
    def stats(running: int, waiting: int, awaiting_kv: int, used: int) -> EngineStats:
        return EngineStats(kv_blocks_total=100, kv_blocks_free=100 - used, running=running, waiting=waiting,
                           awaiting_kv=awaiting_kv, prompt_tokens_total=0, cached_prompt_tokens_total=0)  # fmt: skip

    assert stats(running=2, waiting=0, awaiting_kv=0, used=60).kv_wanted_fraction == pytest.approx(0.6)
    assert stats(running=2, waiting=3, awaiting_kv=1, used=90).kv_wanted_fraction == pytest.approx(1.5)  # 30 each
    assert stats(running=0, waiting=2, awaiting_kv=0, used=0).kv_wanted_fraction == 0.0  # nothing to go by


def test_a_pool_without_reports_yet_keeps_its_count():
    assert PrefillPolicy(4096)(context(1))[0] == 0
    assert DecodePolicy(32, 0.7)(context(0))[0] == 0


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_the_pools_autoscaling_is_a_valid_serve_autoscaling_config_with_pdserves_policy(role):
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    scaling = PoolAutoscaling(min_replicas=1, max_replicas=3, upscale_delay_s=0)
    serve_config = AutoscalingConfig(**scaling.serve_config(role))
    policy = _apply_autoscaling_config(_resolve_policy_callable(serve_config.policy))  # as Serve's controller does
    busy = {QUEUED_PREFILL_TOKENS: [9000], RUNNING_SEQS: [100], KV_WANTED_FRACTION: [0.1]}
    # prefill: 9000 tokens at 4096 each; decode: 100 sequences at 32 each (Serve bounds it to 3 afterwards)
    assert policy(context(1, serve_config, **busy))[0] == {"prefill": 3, "decode": 4}[role]


PREFILL, DECODE = DeploymentID("PrefillWorker", "pdserve"), DeploymentID("DecodeWorker", "pdserve")


def pools(prefill_replicas: int, decode_replicas: int, prefill: dict, decode: dict, horizon_s: float = 0.0) -> dict:
    """Both pools' contexts as Serve hands them to an application-level policy, each with pdserve's own
    pool policy in its config (1 to 8 replicas, no delay; targets: 4096 queued tokens, 32 sequences; the prefill
    queue's growth projected ``horizon_s``)."""
    scaling = PoolAutoscaling(min_replicas=1, max_replicas=8, upscale_delay_s=0)
    prefill_scaling = scaling.model_copy(update={"queue_growth_horizon_s": horizon_s})
    return {
        PREFILL: context(prefill_replicas, AutoscalingConfig(**prefill_scaling.serve_config("prefill")), **prefill),
        DECODE: context(decode_replicas, AutoscalingConfig(**scaling.serve_config("decode")), "DecodeWorker", **decode),
    }


def app_policy(slack: float = 2.0):
    """The coordinated policy as Serve's controller runs it: resolved from config, delays and bounds applied."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
    from ray.serve.config import AutoscalingPolicy

    policy = AutoscalingPolicy(**PoolCoordination(ratio_slack=slack).serve_policy())
    return _apply_app_level_autoscaling_config(_resolve_policy_callable(policy))


# The measured work of one request: 2000 prompt tokens at 4000 tokens/s on a prefill replica (0.5 s),
# 100 output tokens at 400 tokens/s on a decode replica at its target of 32 sequences (12.5 tokens/s each:
# 0.25 s): two prefill replicas per decode replica.
RATES = (
    {PREFILL_TOKENS_PER_S: [4000], PROMPT_TOKENS_MEAN: [2000]},
    {DECODE_TOKENS_PER_SEQ_S: [12.5], OUTPUT_TOKENS_MEAN: [100]},
)


def test_the_measured_work_gives_the_prefill_to_decode_ratio():
    prefill, decode = RATES
    assert CoordinatedPolicy().ideal_ratio(context(1, **prefill), context(1, **decode), 32) == pytest.approx(2.0)


def test_a_decode_replica_counts_for_the_sequences_it_is_meant_to_hold_not_those_it_held_when_measured():
    prefill, decode = RATES  # each sequence's rate measured alone: 12.5 tokens/s
    policy = CoordinatedPolicy()
    by_target = {seqs: policy.ideal_ratio(context(1, **prefill), context(1, **decode), seqs) for seqs in (8, 32)}
    assert by_target[32] == pytest.approx(4 * by_target[8])  # four times the batch: four times the decode work


def test_a_decode_pool_growing_on_long_generations_grows_the_prefill_pool_with_it():
    prefill, decode = RATES
    busy_decode = {**decode, RUNNING_SEQS: [150], KV_WANTED_FRACTION: [0.3]}  # 150 sequences: five decode replicas
    decisions, _ = app_policy(slack=2.0)(pools(1, 1, {**prefill, QUEUED_PREFILL_TOKENS: [0]}, busy_decode))
    assert decisions == {PREFILL: 5, DECODE: 5}  # ideal 2 per decode replica; within slack 2: at least 1 each


def test_a_prefill_pool_growing_on_long_prompts_grows_the_decode_pool_only_past_the_slack():
    prefill, decode = RATES
    queued = {**prefill, QUEUED_PREFILL_TOKENS: [24_000]}  # six prefill replicas' worth
    idle_decode = {**decode, RUNNING_SEQS: [2], KV_WANTED_FRACTION: [0.1]}
    assert app_policy(slack=4.0)(pools(1, 1, queued, idle_decode))[0] == {PREFILL: 6, DECODE: 1}  # 6 ≤ 2 × 4
    assert app_policy(slack=1.0)(pools(1, 1, queued, idle_decode))[0] == {PREFILL: 6, DECODE: 3}  # 6 = 2 × 3


def test_pools_at_their_minimum_ask_nothing_of_each_other_whatever_the_ratio():
    prefill, decode = RATES  # ideal 2 prefill per decode replica: 1:1 is outside slack 1.5
    idle = app_policy(slack=1.5)(pools(1, 1, {**prefill, QUEUED_PREFILL_TOKENS: [0]}, {**decode, RUNNING_SEQS: [3]}))
    assert idle[0] == {PREFILL: 1, DECODE: 1}


def test_without_measured_rates_each_pool_scales_on_its_own_load():
    decisions, _ = app_policy()(pools(1, 1, {QUEUED_PREFILL_TOKENS: [9000]}, {RUNNING_SEQS: [10]}))
    assert decisions == {PREFILL: 3, DECODE: 1}


def test_the_decode_pool_makes_room_for_the_prompts_queued_on_the_prefill_pool_and_held_for_it():
    # a decode pool of 4,096-token KV pools, a quarter wanted; 12,288 prompt tokens on their way to it
    decode = {RUNNING_SEQS: [2], KV_WANTED_FRACTION: [0.25], KV_POOL_TOKENS: [4096]}
    contexts = pools(1, 1, {QUEUED_PREFILL_TOKENS: [8192]}, decode)
    contexts[DeploymentID("Router", "pdserve")] = context(1, AutoscalingConfig(min_replicas=1, max_replicas=2),
                                                          "Router", **{HELD_PREFILL_TOKENS: [4096]})  # fmt: skip
    assert app_policy()(contexts)[0][DECODE] == 5  # (0.25 + 3 pools) / 0.7
    assert app_policy()(pools(1, 1, {QUEUED_PREFILL_TOKENS: [0]}, decode))[0][DECODE] == 1  # nothing on its way


def test_a_decode_pool_that_has_not_reported_its_kv_pool_size_is_not_sized_for_the_prefill_backlog():
    decisions, _ = app_policy()(pools(1, 1, {QUEUED_PREFILL_TOKENS: [40_000]}, {KV_WANTED_FRACTION: [0.25]}))
    assert decisions[DECODE] == 1


def test_prompts_the_routers_hold_for_the_prefill_pool_count_as_queued_on_it():
    contexts = pools(1, 1, {QUEUED_PREFILL_TOKENS: [4096]}, {RUNNING_SEQS: [10]})
    router = DeploymentID("Router", "pdserve")
    contexts[router] = context(1, AutoscalingConfig(min_replicas=1, max_replicas=2), "Router",
                               **{HELD_PREFILL_TOKENS: [12_000]})  # fmt: skip
    assert app_policy()(contexts)[0][PREFILL] == 4  # (4,096 queued + 12,000 held) / 4,096


def test_prompts_the_routers_hold_in_growing_numbers_count_in_the_prefill_pools_projection():
    contexts = pools(1, 1, {QUEUED_PREFILL_TOKENS: [4096]}, {RUNNING_SEQS: [10]}, horizon_s=10)
    contexts[PREFILL].raw_metrics[QUEUED_PREFILL_TOKENS] = {"r0": [TimeStampedValue(float(t), 4096) for t in range(4)]}
    router = DeploymentID("Router", "pdserve")
    contexts[router] = context(1, AutoscalingConfig(min_replicas=1, max_replicas=2), "Router",
                               readings={HELD_PREFILL_TOKENS: [[0, 1000, 2000, 3000]]},
                               **{HELD_PREFILL_TOKENS: [1500]})  # fmt: skip
    # 4,096 queued + 3,000 held now, the held growing 1,000 a second for 10 s
    assert app_policy()(contexts)[0][PREFILL] == 5  # ceil(17,096 / 4,096)


def test_a_busy_rate_counts_only_the_time_with_work():
    now = [0.0]
    rate = BusyRate(window_s=1e9, clock=lambda: now[0])
    assert rate.rate() is None  # nothing seen
    rate.begin()
    now[0] = 2.0
    rate.add(1000)
    rate.end()
    now[0] = 60.0  # a minute idle does not dilute it
    assert rate.rate() == pytest.approx(500.0)


def test_a_per_request_rate_is_the_tokens_of_one_request_per_second():
    now = [0.0]
    rate = BusyRate(window_s=1e9, clock=lambda: now[0], per_request=True)
    for _ in range(4):  # four streams together for 2 s, 10 tokens a second each
        rate.begin()
    now[0] = 2.0
    rate.add(4 * 20)
    for _ in range(4):
        rate.end()
    now[0] = 60.0
    assert rate.rate() == pytest.approx(10.0)


def test_tokens_per_request_count_a_long_generation_while_it_streams_not_when_it_ends():
    now = [0.0]
    output = TokensPerRequest(window_s=10.0, clock=lambda: now[0])
    assert output.value is None  # nothing seen
    for _ in range(4):  # the old mix: 32-token outputs, done
        output.begin()
        output.add(32)
    assert output.value == pytest.approx(32.0)
    for second in range(1, 11):  # then two 256-token streams a second begin, each 10 tokens a second
        now[0] = float(second)
        for _ in range(2):
            output.begin()
        output.add(10 * 2 * second)  # every stream begun so far gives its 10 tokens
    assert output.value > 50  # ten seconds in (one window), none of them finished: 32 by finished lengths


def test_tokens_per_request_forget_the_old_mix_in_time_however_few_requests_a_replica_sees():
    now = [0.0]
    prompts = TokensPerRequest(window_s=10.0, clock=lambda: now[0])
    for _ in range(10):
        prompts.begin()
        prompts.add(2048)
    now[0] = 30.0  # three windows later, three short prompts outweigh the ten long ones
    for _ in range(3):
        prompts.begin()
        prompts.add(256)
    assert prompts.value < 600  # a mean moving 5 % a request would still read ~1,800


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"service.prefill.autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas (3) is above"),
        ({"service.decode.autoscaling": {"target_running_seqs": -4}}, "service.decode.autoscaling.target_running_seqs"),
        ({"service.decode.autoscaling": {"target_kv_used_fraction": 1.5}}, "target_kv_used_fraction"),
        ({"service.prefill.autoscaling": {"target_queued_prefill_tokens": 0}}, "target_queued_prefill_tokens"),
        ({"service.prefill.autoscaling": {"queue_growth_horizon_s": -1}}, "queue_growth_horizon_s"),
        ({"service.decode.autoscaling": {"target_queued_prefill_tokens": 8}}, "a prefill pool's setting"),
        ({"service.prefill.autoscaling": {"target_running_seqs": 8}}, "prefill.autoscaling.target_running_seqs"),
        ({"service.prefill.autoscaling": {"min_replicas": 0}}, "service.prefill.autoscaling.min_replicas"),
        ({"service.decode.autoscaling": {"upscale_delay_s": -1}}, "upscale_delay_s"),
        ({"service.decode.autoscaling": {}, "service.decode.autoscaling_config": {"max_replicas": 2}}, "give one"),
        ({"service.router.autoscaling": {}}, "service.router.autoscaling"),
        ({"service.router.autoscaling_config": {"max_replicas": 2}}, "would see none: set num_replicas"),
        ({"router.recovery.drain_finish_s": 29}, "drain_finish_s (29) must leave streams 2 s"),
        ({"service.decode.graceful_shutdown_timeout_s": 0}, "service.decode.graceful_shutdown_timeout_s"),
        ({"service.coordination": {}}, "coordination: give service.prefill.autoscaling"),
        (
            {
                "service.coordination": {"ratio_slack": 0.5},
                "service.prefill.autoscaling": {},
                "service.decode.autoscaling": {},
            },
            "service.coordination.ratio_slack",
        ),  # fmt: skip
    ],
)
def test_bad_autoscaling_config_is_refused_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=changes)
