"""The measured profile's fit: step timings of a known profile give that profile back."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.engine_profile import (
    CACHED_PREFIX_SHAPES,
    DECODE_OUTPUT_TOKENS,
    DECODE_SHAPES,
    PREFILL_TOKENS,
    StepTiming,
    decode_step,
    fit,
    median_timing,
    with_request_time,
)
from bench.simulator_check import furthest_from_one, pair_figures, run_simulator_check
from engine.sim.profile import PROFILES


def shapes() -> list[tuple[int, int, int, int]]:
    """(prompt tokens, sequences, context tokens, prompt x cached tokens) of each step the measurement times."""
    decode = [(0, s, s * (prompt + DECODE_OUTPUT_TOKENS // 2), 0) for s, prompt in DECODE_SHAPES]
    cached = [(p, 0, 0, p * x) for p, x in CACHED_PREFIX_SHAPES]
    return [(p, 0, 0, 0) for p in PREFILL_TOKENS] + cached + decode


def timings_of(profile) -> list[StepTiming]:
    return [StepTiming(p, s, c, 1000 * profile.step_s(p, s, c, x), x) for p, s, c, x in shapes()]


def test_the_fit_gives_back_the_profile_the_timings_came_from():
    profile = replace(PROFILES["llama-3.1-8b-h100"], prefill_ms_per_context_pair=2e-7, prefill_step_ms=12.0)
    fitted = fit(timings_of(profile))
    for name, value in fitted.items():
        assert value == pytest.approx(getattr(profile, name), rel=1e-6, abs=1e-9), name


def test_a_step_with_prompt_tokens_gets_a_constant_of_its_own_and_decode_steps_keep_theirs():
    """As measured on vLLM-CPU: 16 prompt tokens alone 20 ms, a step of one decoding sequence 9.3 ms."""
    timings = [StepTiming(p, s, c, 9.0 + (11.0 if p else 0.0) + 0.2 * p + 0.3 * s, x) for p, s, c, x in shapes()]
    fitted = fit(timings)
    assert fitted["base_ms"] == pytest.approx(9.0) and fitted["prefill_step_ms"] == pytest.approx(11.0)
    assert fitted["prefill_ms_per_token"] == pytest.approx(0.2) and fitted["decode_ms_per_seq"] == pytest.approx(0.3)


def test_a_coefficient_that_fits_negative_is_dropped_and_the_rest_refitted():
    timings = [StepTiming(p, s, c, 10.0 + 0.1 * p + 0.5 * s - 0.001 * c, x) for p, s, c, x in shapes()]
    fitted = fit(timings)
    assert all(value >= 0 for value in fitted.values())
    assert fitted["decode_ms_per_context_token"] == 0.0 and fitted["prefill_ms_per_token"] == pytest.approx(0.1)


def test_a_shape_timed_several_times_keeps_the_median():
    repeats = [StepTiming(0, 1, 576, ms) for ms in (10.6, 8.6, 10.1)]
    assert median_timing(repeats) == StepTiming(0, 1, 576, 10.1)


def test_a_pair_is_the_ratio_of_the_medians_of_its_rounds():
    real = [{"ttft_p50_ms": t, "tpot_p50_ms": 10.0} for t in (100.0, 180.0, 120.0)]
    simulated = [{"ttft_p50_ms": t, "tpot_p50_ms": 9.0} for t in (110.0, 105.0, 300.0)]
    pair = pair_figures(real, simulated)
    assert pair["ttft_p50_sim_vs_real"] == pytest.approx(110.0 / 120.0)
    assert pair["tpot_p50_sim_vs_real"] == pytest.approx(0.9)
    assert pair["real_rounds"] == real


def test_no_rounds_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="rounds"):
        run_simulator_check(None, 0, 1e9, None, rounds=0)


def test_the_headline_ratio_is_the_pair_furthest_from_one():
    assert furthest_from_one([0.95, 1.2, 0.9]) == 1.2
    assert furthest_from_one([0.7, 1.2]) == 0.7


def test_a_decode_step_is_timed_while_every_stream_runs():
    """Three streams, 10 ms a step while all run; the last starts late and the first ends early."""
    runs = [[0.000 + 0.010 * k for k in range(12)], [0.020 + 0.010 * k for k in range(12)],
            [0.050 + 0.010 * k for k in range(12)]]  # fmt: skip
    step = decode_step(3, 64, 12, runs)
    assert step.ms == pytest.approx(10.0) and (step.decode_seqs, step.context_tokens) == (3, 3 * (64 + 6))


def test_streams_that_never_all_run_at_once_give_no_step_rather_than_a_wrong_one():
    with pytest.raises(RuntimeError, match="never decoded all at once"):
        decode_step(2, 64, 3, [[0.0, 0.01, 0.02], [0.5, 0.51, 0.52]])


def test_a_requests_time_is_the_median_worker_time_to_a_prefix_hits_first_token_past_its_step():
    profile = PROFILES["llama-3.1-8b-h100"]
    fresh, cached = shape = (64, 512)
    step_ms = 1000 * profile.step_s(fresh, 0, 0, fresh * cached)
    measured = with_request_time(profile, [step_ms + extra for extra in (15.0, 11.0, 30.0, 12.0, 14.0)], shape)
    assert measured.request_ms == pytest.approx(14.0)
    assert replace(measured, request_ms=0.0) == profile  # the steps as fitted


def test_worker_times_within_the_step_give_no_request_time_rather_than_a_negative_one():
    profile = PROFILES["llama-3.1-8b-h100"]
    assert with_request_time(profile, [0.5, 0.7, 0.6], (64, 512)).request_ms == 0.0
