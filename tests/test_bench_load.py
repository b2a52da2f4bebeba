"""The benchmark's workloads, summaries and plots (the load generator itself runs against the service in
test_service.py and test_cli.py)."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import psutil
import pytest

from bench import plots
from bench.load import SLO, LoadSpec, Record, summarize
from bench.workloads import WorkloadSpec, make_workload

VOCAB = 1000


@pytest.mark.parametrize("name", ["random", "shared-prefix", "multi-turn", "long-doc"])
def test_every_workload_is_reproducible_from_its_seed(name):
    spec = WorkloadSpec(name, requests=12, input_tokens=40, output_tokens=8, system_prompt_tokens=64,
                        document_tokens=128, seed=5)  # fmt: skip
    assert make_workload(spec, VOCAB) == make_workload(spec, VOCAB)
    assert make_workload(spec, VOCAB) != make_workload(WorkloadSpec(**{**spec.__dict__, "seed": 6}), VOCAB)
    assert make_workload(spec, VOCAB).requests == 12


def test_shared_prefix_prompts_start_with_one_of_the_system_prompts():
    spec = WorkloadSpec("shared-prefix", requests=50, input_tokens=10, system_prompts=3, system_prompt_tokens=32)
    heads = {tuple(session[0].prompt[:32]) for session in make_workload(spec, VOCAB).sessions}
    assert len(heads) == 3


def test_each_turn_of_a_conversation_extends_the_one_before():
    sessions = make_workload(WorkloadSpec("multi-turn", requests=8, turns=4, input_tokens=10), VOCAB).sessions
    assert len(sessions) == 2
    for turns in sessions:
        for before, after in zip(turns, turns[1:], strict=False):
            assert after.prompt[: len(before.prompt)] == before.prompt and len(after.prompt) > len(before.prompt)


def test_an_unknown_workload_is_named():
    with pytest.raises(ValueError, match="unknown workload 'chat'"):
        make_workload(WorkloadSpec("chat"), VOCAB)


def test_a_load_is_either_open_or_closed_loop():
    with pytest.raises(ValueError, match="either a rate"):
        LoadSpec(rate=1.0, users=2)
    with pytest.raises(ValueError, match="either a rate"):
        LoadSpec()


def test_goodput_counts_requests_meeting_both_slos_per_second():
    records = [
        Record(0, 0, 0.0, 100, ttft_s=0.1, e2e_s=0.1 + 9 * 0.02, output_tokens=10),  # meets both
        Record(1, 0, 0.0, 100, ttft_s=0.5, e2e_s=0.5 + 9 * 0.02, output_tokens=10),  # TTFT too slow
        Record(2, 0, 0.0, 100, ttft_s=0.1, e2e_s=0.1 + 9 * 0.05, output_tokens=10),  # TPOT too slow
        Record(3, 0, 0.0, 100, error="HTTP 429"),
    ]
    summary = summarize(records, wall_s=2.0, slo=SLO(ttft_ms=200, tpot_ms=30))
    assert summary["goodput_rps"] == 0.5 and summary["slo_attainment"] == 0.25
    assert summary["errors"] == 1 and summary["requests"] == 4


def test_plots_are_png_files(tmp_path):
    cdf = plots.cdf({"a": [0.1, 0.2, 0.3], "b": [0.2, 0.4]}, "TTFT", "ms", tmp_path / "cdf.png")
    goodput = plots.goodput([0.5, 1.0], {"a": [0.5, 0.8]}, "goodput", tmp_path / "g" / "goodput.png")
    for path in (cdf, goodput):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_comparison_reports_ratios_to_its_first_variant():
    from bench.compare import _ratios, markdown

    def run(ttft_ms: float, hit_rate: float) -> dict:
        records = [Record(0, 0, 0.0, 100, ttft_s=ttft_ms / 1000, e2e_s=1.0, output_tokens=10,
                          cached_tokens=int(100 * hit_rate))]  # fmt: skip
        return {"summary": summarize(records, 1.0, SLO(1000, 1000)), "overrides": {}}

    runs = {"round_robin": run(400, 0.0), "prefix_aware": run(100, 0.5)}
    ratios = _ratios(runs)
    assert ratios["prefix_aware"]["ttft_p50_speedup"] == 4.0
    assert ratios["prefix_aware"]["hit_rate_ratio"] is None  # no ratio to a hit rate of zero
    report = {"workload": {"name": "shared-prefix"}, "variants": runs, "ratios_to_first": ratios}
    text = markdown(report, ["ttft_cdf.png"])
    assert text.startswith("# shared-prefix: round_robin vs prefix_aware") and "![ttft_cdf.png](ttft_cdf.png)" in text


def test_soak_memory_growth_is_a_trend_not_the_phase_of_an_allocators_sawtooth():
    from bench.soak import SoakSpec, rss_growth

    spec = SoakSpec(duration_s=400, warmup_s=100)
    sawtooth = [(t, {"worker": 1000 + 50 * (t // 10 % 4)}) for t in range(0, 400, 10)]  # drops back every 40 s
    leaking = [(t, {"worker": 1000 + t}) for t in range(0, 400, 10)]
    assert abs(rss_growth(spec, sawtooth)["worker"]) < 0.01
    assert rss_growth(spec, leaking)["worker"] > 0.1


def test_a_step_trace_sends_at_each_phases_rate_and_is_reproducible():
    from bench.autoscale import Phase, StepTrace

    trace = StepTrace(phases=(Phase(1.0, 200.0), Phase(10.0, 100.0), Phase(1.0, 200.0)), seed=3)
    arrivals = [at for at, _ in trace.arrivals()]
    assert arrivals == sorted(arrivals) and trace.arrivals() == StepTrace(phases=trace.phases, seed=3).arrivals()
    per_phase = [sum(lo <= at < hi for at in arrivals) for lo, hi in ((0, 200), (200, 300), (300, 500))]
    assert 150 < per_phase[0] < 250 and 850 < per_phase[1] < 1150 and 150 < per_phase[2] < 250


def test_replica_seconds_are_the_area_under_the_replicas_held():
    from bench.autoscale import replica_seconds

    held = [(0.0, 2), (10.0, 4), (20.0, 2)]  # 2 for 10 s, 4 for 10 s, 2 until the end at 25 s
    assert replica_seconds(held, 25.0) == 20 + 40 + 10


def test_the_three_autoscaling_settings_share_bounds_and_delays():
    from bench.autoscale import StepTrace, settings
    from pdserve.config import load_config

    trace = StepTrace(max_prefill_replicas=2, max_decode_replicas=3)
    configs = {name: load_config(overrides=changes) for name, changes in settings(trace).items()}
    assert configs["fixed"].service.decode.num_replicas == 3 and configs["fixed"].service.prefill.num_replicas == 2
    default, ours = configs["serve_default"].service.decode, configs["pdserve"].service.decode
    assert default.autoscaling_config["max_replicas"] == ours.autoscaling.max_replicas == 3
    assert default.autoscaling_config["downscale_delay_s"] == ours.autoscaling.downscale_delay_s
    assert configs["pdserve"].service.coordination is not None


def test_the_simulated_step_trace_needs_3_prefill_and_6_decode_replicas_at_its_peaks():
    from bench.autoscale import SIMULATED_TIME_SCALE, simulated_trace
    from bench.placement_live import scaled_profile
    from engine.sim.profile import HardwareProfile

    profile, trace = HardwareProfile(**scaled_profile(SIMULATED_TIME_SCALE)), simulated_trace()
    prompt_heavy = max(trace.phases, key=lambda p: p.rate * p.input_tokens)
    decode_heavy = max(trace.phases, key=lambda p: p.rate * p.output_tokens)
    busy_prefill = prompt_heavy.rate * profile.step_s(prompt_heavy.input_tokens, 0, 0)
    streams = decode_heavy.rate * decode_heavy.output_tokens * profile.step_s(0, 1, decode_heavy.input_tokens)
    assert math.ceil(busy_prefill) >= 3 and trace.max_prefill_replicas >= 3
    assert streams / trace.target_running_seqs >= 6 and trace.max_decode_replicas >= 6
    assert prompt_heavy != decode_heavy and trace.phases[-1].rate < decode_heavy.rate  # the mix moves, then it ebbs


def test_a_stream_running_when_a_decode_replica_left_counts_as_lost_only_if_it_failed_or_came_back_short():
    from bench.autoscale import Sample, streams_in_scale_down

    none_starting = {"prefill": 0, "decode": 0}
    samples = [
        Sample(10.0, 4, {"prefill": 1, "decode": 3}, none_starting, None),
        Sample(20.0, 3, {"prefill": 1, "decode": 2}, none_starting, None),
    ]
    records = [
        Record(0, 0, 2.0, 8, e2e_s=20.0, output_tokens=16),  # ran through the scale-down, whole
        Record(1, 0, 3.0, 8, e2e_s=20.0, output_tokens=9),  # ran through it, short
        Record(2, 0, 4.0, 8, error="UNAVAILABLE"),  # ran through it, failed
        Record(3, 0, 1.0, 8, e2e_s=2.0, output_tokens=16),  # ended before it
        Record(4, 0, 25.0, 8, e2e_s=5.0, output_tokens=16),  # began after it
    ]
    assert streams_in_scale_down(records, [16] * 5, samples) == (3, 2)


def test_each_phase_reports_its_requests_by_arrival_and_whether_they_missed_on_ttft_or_on_tpot():
    from bench.autoscale import Phase, StepTrace, by_phase

    trace = StepTrace(phases=(Phase(1.0, 10.0), Phase(2.0, 10.0)))
    slo = SLO(ttft_ms=500, tpot_ms=50)
    late_parts = {"placement": 0.7, "worker": 0.2}
    records = [
        Record(0, 0, 1.0, 8, ttft_s=0.1, e2e_s=0.5, output_tokens=11),  # met
        Record(1, 0, 9.0, 8, ttft_s=0.9, e2e_s=1.3, output_tokens=11, ttft_parts_s=late_parts),  # TTFT missed
        Record(2, 0, 12.0, 8, ttft_s=0.1, e2e_s=1.1, output_tokens=11),  # TPOT missed (100 ms)
        Record(3, 0, 15.0, 8, error="UNAVAILABLE"),
    ]
    first, second = by_phase(trace, records, slo)
    assert first == {"requests": 2, "slo_attainment": 0.5, "ttft_missed": 1, "tpot_missed": 0, "errors": 0,
                     "ttft_missed_arrivals_s": [9.0],  # seconds into its phase
                     "ttft_missed_parts_mean_ms": {"placement": 700.0, "worker": 200.0}}  # fmt: skip
    assert second == {"requests": 2, "slo_attainment": 0.0, "ttft_missed": 0, "tpot_missed": 1, "errors": 1,
                      "ttft_missed_arrivals_s": [], "ttft_missed_parts_mean_ms": {}}  # fmt: skip


def test_scaling_events_are_the_samples_where_a_pools_running_or_starting_count_changed():
    from bench.autoscale import Sample, scaling_events

    def sample(at_s: float, prefill: tuple[int, int], decode: tuple[int, int]) -> Sample:
        return Sample(at_s, 0, {"prefill": prefill[0], "decode": decode[0]},
                      {"prefill": prefill[1], "decode": decode[1]}, None)  # fmt: skip

    samples = [sample(0.0, (1, 0), (1, 0)), sample(0.5, (1, 3), (1, 0)), sample(1.0, (1, 3), (1, 0)),
               sample(1.5, (4, 0), (1, 2))]  # fmt: skip
    assert scaling_events(samples) == [(0.0, "prefill", 1, 0), (0.0, "decode", 1, 0), (0.5, "prefill", 1, 3),
                                       (1.5, "prefill", 4, 0), (1.5, "decode", 1, 2)]  # fmt: skip


def test_the_ttft_parts_are_summarized_as_means_that_add_up_to_the_mean_ttft():
    records = [Record(0, 0, 0.0, 8, ttft_s=0.3, ttft_parts_s={"placement": 0.1, "worker": 0.2}),
               Record(1, 0, 1.0, 8, ttft_s=0.5, ttft_parts_s={"placement": 0.1, "worker": 0.4})]  # fmt: skip
    summary = summarize(records, wall_s=2.0)
    assert summary["ttft_parts_mean_ms"] == pytest.approx({"placement": 100.0, "worker": 300.0})
    assert sum(summary["ttft_parts_mean_ms"].values()) == pytest.approx(summary["ttft"]["mean_ms"])


def test_the_routers_ttft_and_its_parts_are_read_from_its_metrics_page():
    from prometheus_client import generate_latest

    from bench.vllm_compare import ttft_sums
    from router.metrics import RouterMetrics

    metrics = RouterMetrics("model", health=lambda: None)
    for ttft, placement in ((0.25, 0.05), (0.75, 0.15)):
        metrics.ttft.observe(ttft)
        metrics.ttft_parts.labels("placement").observe(placement)
        metrics.ttft_parts.labels("worker").observe(ttft - placement)
    sums = ttft_sums(generate_latest(metrics.registry).decode())
    assert sums["server_ttft"] == pytest.approx((1.0, 2))
    assert sums["ttft_placement"] == pytest.approx((0.2, 2)) and sums["ttft_worker"] == pytest.approx((0.8, 2))


def test_vllms_own_ttft_is_read_from_its_metrics_page_over_its_engines():
    from bench.vllm_compare import ttft_sums

    text = """# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 3.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.9
vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_sum{engine="1",model_name="m"} 0.3
"""
    assert ttft_sums(text) == {"server_ttft": pytest.approx((1.2, 4.0))}


def test_the_prefix_hits_of_either_server_are_read_from_its_metrics_page():
    from bench.vllm_compare import prefix_hits

    vllm = (
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 2048.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1024.0\n'
    )
    pdserve = (
        'pdserve:prompt_tokens_total{pool="decode"} 300.0\npdserve:prompt_tokens_total{pool="prefill"} 100.0\n'
        'pdserve:prefix_cache_hit_tokens_total{pool="decode"} 200.0\n'
    )
    assert prefix_hits(vllm) == (1024.0, 2048.0) and prefix_hits(pdserve) == (200.0, 400.0)


SERVER_STARTS_A_CHILD = """
import subprocess, sys
child = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(30)"]
subprocess.Popen([*child, sys.executable, "-c", "import time; time.sleep(30)", "--multiprocessing-fork"])
import time; time.sleep(30)
"""


def test_the_processes_a_server_starts_are_its_engine_core_and_its_rank():
    """As vLLM's server starts them (multiprocessing spawns: ``--multiprocessing-fork`` in the title), named by
    where they sit."""
    from bench.vllm_compare import role_of

    server = subprocess.Popen([sys.executable, "-c", SERVER_STARTS_A_CHILD, "vllm.entrypoints.openai.api_server"])
    try:
        deadline = time.monotonic() + 30
        while len(tree := psutil.Process(server.pid).children(recursive=True)) < 2:
            assert time.monotonic() < deadline, "the server's processes did not start"
            time.sleep(0.05)
        engine_core, rank = sorted(tree, key=lambda process: process.create_time())
        assert role_of(psutil.Process(server.pid)) == "vllm api server"
        assert role_of(engine_core) == "vllm api server engine core" and role_of(rank) == "vllm api server rank"
    finally:
        for process in psutil.Process(server.pid).children(recursive=True):
            process.kill()
        server.kill()
        server.wait(10)


def test_serving_processes_are_named_by_their_titles():
    from bench.vllm_compare import role_by_title

    assert role_by_title("ray::ServeReplica:pdserve:DecodeWorker") == "DecodeWorker"
    assert role_by_title("ray::ProxyActor") == "serve proxy"
    assert role_by_title("ray::ServeController") == "serve controller"
    assert role_by_title("/x/python -m pdserve.cli up --model m") == "pdserve up"
    assert role_by_title("/x/bin/raylet --node_ip_address=1") == "ray"
    assert role_by_title("VLLM::EngineCore") is None


def test_the_cores_a_role_used_are_the_medians_of_its_rounds_and_0_in_a_round_without_it():
    from bench.vllm_compare import cores_used

    rounds = [{"cores_busy_by_group": {"Router": 0.1}, "cores_waited_for_by_group": {"Router": 0.2}},
              {"cores_busy_by_group": {"Router": 0.3, "client": 0.4}, "cores_waited_for_by_group": {"Router": 0.4}},
              {"cores_busy_by_group": {"Router": 0.2}, "cores_waited_for_by_group": {"Router": 0.9}}]  # fmt: skip
    used = cores_used(rounds)
    assert used["Router"] == {"busy": 0.2, "waited_for": 0.4} and used["client"] == {"busy": 0.0, "waited_for": 0.0}
