"""Each pool scales on its own load, through Serve's custom-policy hook; bad scaling config is named."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from pdserve.autoscaling import KV_USED_FRACTION, QUEUED_PREFILL_TOKENS, RUNNING_SEQS, DecodePolicy, PrefillPolicy
from pdserve.config import ConfigError, PoolAutoscaling, load_config


def context(replicas: int, config: AutoscalingConfig | None = None, **per_replica: list[float]) -> AutoscalingContext:
    """What Serve hands a policy: each figure averaged per replica over the look-back window."""
    ids = [f"r{i}" for i in range(replicas)]
    metrics = {name: dict(zip(ids, values, strict=True)) for name, values in per_replica.items()}
    return AutoscalingContext(
        deployment_id=DeploymentID("PrefillWorker", "pdserve"), deployment_name="PrefillWorker", app_name="pdserve",
        current_num_replicas=replicas, target_num_replicas=replicas, running_replicas=ids, total_num_requests=0.0,
        total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=config.max_replicas if config else 8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=config,
    )  # fmt: skip


def test_a_queue_of_long_prompts_grows_the_prefill_pool_whatever_the_request_count():
    policy = PrefillPolicy(target_queued_prefill_tokens=4096)
    # two replicas, each with a few long prompts queued: 20k tokens wants five replicas
    assert policy(context(2, **{QUEUED_PREFILL_TOKENS: [12_000, 8_000]}))[0] == 5
    assert policy(context(2, **{QUEUED_PREFILL_TOKENS: [1_000, 500]}))[0] == 1
    assert policy(context(3, **{QUEUED_PREFILL_TOKENS: [0, 0, 0]}))[0] == 0  # Serve keeps min_replicas


def test_the_decode_pool_grows_on_running_sequences_or_on_kv_use_whichever_asks_more():
    policy = DecodePolicy(target_running_seqs=32, target_kv_used_fraction=0.7)
    long_generations = context(2, **{RUNNING_SEQS: [60, 70], KV_USED_FRACTION: [0.5, 0.6]})
    assert policy(long_generations)[0] == 5  # 130 sequences at 32 each
    long_contexts = context(2, **{RUNNING_SEQS: [4, 4], KV_USED_FRACTION: [0.95, 0.9]})
    assert policy(long_contexts)[0] == 3  # 1.85 pools' worth at 0.7 each
    assert policy(context(2, **{RUNNING_SEQS: [1, 0], KV_USED_FRACTION: [0.05, 0.0]}))[0] == 1


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
    busy = {QUEUED_PREFILL_TOKENS: [9000], RUNNING_SEQS: [100], KV_USED_FRACTION: [0.1]}
    # prefill: 9000 tokens at 4096 each; decode: 100 sequences at 32 each (Serve bounds it to 3 afterwards)
    assert policy(context(1, serve_config, **busy))[0] == {"prefill": 3, "decode": 4}[role]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"service.prefill.autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas (3) is above"),
        ({"service.decode.autoscaling": {"target_running_seqs": -4}}, "service.decode.autoscaling.target_running_seqs"),
        ({"service.decode.autoscaling": {"target_kv_used_fraction": 1.5}}, "target_kv_used_fraction"),
        ({"service.prefill.autoscaling": {"target_queued_prefill_tokens": 0}}, "target_queued_prefill_tokens"),
        ({"service.prefill.autoscaling": {"min_replicas": 0}}, "service.prefill.autoscaling.min_replicas"),
        ({"service.decode.autoscaling": {"upscale_delay_s": -1}}, "upscale_delay_s"),
        ({"service.decode.autoscaling": {}, "service.decode.autoscaling_config": {"max_replicas": 2}}, "give one"),
        ({"service.router.autoscaling": {}}, "service.router.autoscaling"),
        ({"router.recovery.drain_finish_s": 29}, "drain_finish_s (29) must leave streams 2 s"),
        ({"service.decode.graceful_shutdown_timeout_s": 0}, "service.decode.graceful_shutdown_timeout_s"),
    ],
)
def test_bad_autoscaling_config_is_refused_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=changes)
