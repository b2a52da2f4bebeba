"""The sizing model behind ``pdserve plan``: monotone in load, honest about what cannot be met."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.placement_sim import SharedPrefixTrace
from bench.plan import PlanError, PlanInput, plan

BASE = PlanInput(
    rate_rps=20, input_tokens=2048, output_tokens=256, prefill_tokens_per_s=20_000, decode_tokens_per_s=3000,
    decode_step_ms=15, kv_bytes_per_token=131072, link_gb_per_s=25, kv_cache_gib=40, ttft_slo_ms=1000,
    tpot_slo_ms=40,
)  # fmt: skip


def test_the_plan_meets_both_slos_at_the_target_rate():
    result = plan(BASE)
    assert result.prefill.predicted_ms <= BASE.ttft_slo_ms and result.decode.predicted_ms <= BASE.tpot_slo_ms
    assert result.prefill.utilization < BASE.utilization_cap and result.decode.utilization < BASE.utilization_cap


def test_long_prompts_grow_the_prefill_pool_and_long_outputs_the_decode_pool():
    base = plan(BASE)
    longer_prompts = plan(replace(BASE, input_tokens=4096, ttft_slo_ms=2000))
    longer_outputs = plan(replace(BASE, output_tokens=1024))
    assert longer_prompts.prefill.replicas > base.prefill.replicas
    assert longer_prompts.decode.replicas == base.decode.replicas
    assert longer_outputs.decode.replicas > base.decode.replicas
    assert longer_outputs.prefill.replicas == base.prefill.replicas


def test_twice_the_rate_needs_at_least_as_many_of_each():
    base, double = plan(BASE), plan(replace(BASE, rate_rps=40))
    assert double.prefill.replicas >= base.prefill.replicas and double.decode.replicas > base.decode.replicas


def test_cached_prefixes_shrink_the_prefill_pool():
    assert plan(replace(BASE, hit_rate=0.8)).prefill.replicas < plan(BASE).prefill.replicas


def test_the_hit_rate_can_come_from_the_placement_simulator():
    trace = SharedPrefixTrace(system_prompts=20, min_prompt_tokens=512, max_prompt_tokens=1024, requests=300)
    result = plan(replace(BASE, hit_rate=None, trace=trace, input_tokens=900, kv_cache_gib=1))
    assert 0.3 < result.prefill.figures["hit_rate"] < 1.0


@pytest.mark.parametrize(
    "changes,message",
    [({"tpot_slo_ms": 10}, "below one decode step"), ({"ttft_slo_ms": 50}, "one prompt alone takes")],
)
def test_an_slo_no_pool_can_meet_is_said_plainly(changes, message):
    with pytest.raises(PlanError, match=message):
        plan(replace(BASE, **changes))


def test_the_serving_paths_own_cost_adds_to_ttft():
    base, slower = plan(BASE), plan(replace(BASE, overhead_ms=100))
    assert slower.prefill.replicas == base.prefill.replicas
    assert slower.prefill.predicted_ms == pytest.approx(base.prefill.predicted_ms + 100)
