"""The live placement and router-tier benchmarks' parts: the trace, the cluster sizing and the figures."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.load import Record
from bench.placement_live import ClusterShape, TenantTrace, imbalance, kv_blocks, scaled_profile
from bench.router_live import killed_run_figures
from engine.sim.profile import PROFILES, HardwareProfile


def test_every_request_of_a_tenant_starts_with_its_context_and_the_trace_is_one_per_seed():
    trace = TenantTrace(tenants=3, context_tokens=50, users_per_tenant=2, user_tokens=10, question_tokens=5,
                        rate_per_s=20, duration_s=5)  # fmt: skip
    requests = trace.requests(1000)
    contexts = {tuple(turn.prompt[:50]) for _, turn in requests}
    users = {tuple(turn.prompt[:60]) for _, turn in requests}
    assert len(contexts) == 3 and len(users) <= 6 and all(len(t.prompt) == 65 for _, t in requests)
    assert [a for a, _ in requests] == sorted(a for a, _ in requests) and requests[-1][0] < 5
    assert requests == trace.requests(1000)


def test_each_worker_caches_its_share_of_the_working_set():
    trace = TenantTrace(tenants=16, context_tokens=3072, users_per_tenant=4, user_tokens=128)
    assert kv_blocks(trace, ClusterShape(cache_share=0.25), 16) == 16 * (3072 + 512) // 4 // 16


def test_the_slowed_profile_keeps_the_ratios_of_the_named_one():
    base, slowed = PROFILES["llama-3.1-8b-h100"], HardwareProfile(**scaled_profile(10))
    assert slowed.step_s(3000, 4, 8000) == pytest.approx(10 * base.step_s(3000, 4, 8000))
    assert slowed.transfer_s(3000) == pytest.approx(10 * base.transfer_s(3000))


def test_imbalance_counts_the_idle_workers_of_the_pool():
    assert imbalance(Counter({"a": 3, "b": 1}), 4) == 3.0
    assert imbalance(Counter(), 4) == 0.0


def test_a_killed_router_run_counts_apart_the_requests_sent_after_the_connections_settled():
    records = [Record(0, 0, 10.0, 8, error="UNAVAILABLE"), Record(1, 0, 31.0, 8, error="UNAVAILABLE"),
               Record(2, 0, 36.0, 8, error="UNAVAILABLE"), Record(3, 0, 40.0, 8)]  # fmt: skip
    figures = killed_run_figures(records, {"at_s": 30.0, "router": "r1"})
    counted = ("errors", "errors_sent_before_the_kill", "errors_sent_after_settling")
    assert [figures[key] for key in counted] == [3, 1, 1]
