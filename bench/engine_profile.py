"""The simulated engine's hardware profile, measured from the real engine on this machine (#22 item 2).

One vLLM engine (the config's, in a fresh process, as a worker runs it) is timed at known step shapes:

- prefill: the TTFT of a fresh prompt of ``P`` tokens alone (one step of ``P`` prompt tokens), for
  ``PREFILL_TOKENS``; and of ``P`` fresh tokens after a prefix of ``X`` tokens already cached (one step of
  ``P`` prompt tokens attending to ``X`` more), for ``CACHED_PREFIX_SHAPES``;
- decode: ``S`` requests decoding together, for ``DECODE_SHAPES``: the time per token of each while all
  ``S`` run, median over them (one step of ``S`` sequences holding ``C`` tokens of context between them).

The decode shapes are also timed as deployed (``decode_timings_as_deployed``): ``S`` streams sent through a
running service (``DEPLOYED_DECODE_SHAPES``, longer streams: see there; ``DEPLOYED_REPEATS`` times each, the
median kept), timed by its client. Inside the
service the decode engine steps beside the processes that carry each token on (its replica, the router,
Ray), which on a small node share its cores; the engine alone does not pay that, and neither does a
simulated engine, which takes no CPU. So the simulator's check (``bench/simulator_check.py``) fits its
decode terms to the steps as deployed, as Dynamo's profiler times the decode engine of a deployment through
its front end.

A request's time in its worker outside the steps (``HardwareProfile.request_ms``) is measured as deployed too
(``prefix_hits_as_deployed``): prompts shaped as the workload's prefix hits, as long in output as its requests,
sent one at a time through the service, each a hit on a prefix its decode worker holds and computed there; the
worker's own time to the first token (the router's ``worker`` part of the TTFT) less the fitted step of that
shape (``with_request_time``). The engine alone has vLLM's front end in it too, but on a core nothing else wants.

Each timing is a step of the simulated engine's model (``engine/sim/profile.py``):
``base + [P > 0]·p + a·P + b·P² + x·P·X + c·S + d·C`` ms, fitted by least squares with every coefficient
kept ≥ 0 (a feature whose coefficient comes out negative is dropped and the rest refitted). The KV bytes
per token are the engine's own cache layout; the link is given (``pdserve bench transfer`` measures it here).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.engine_process import call_in_fresh_process
from engine.config import EngineConfig
from engine.sim.profile import HardwareProfile

PREFILL_TOKENS = (16, 64, 128, 256, 512, 1024)
# (sequences, prompt tokens of each): two contexts per batch size, so that the cost of a sequence and the
# cost of a token of context are told apart (with one prompt length, context is a multiple of the batch).
DECODE_SHAPES = tuple((seqs, prompt) for seqs in (1, 4, 16) for prompt in (64, 512))
CACHED_PREFIX_SHAPES = ((64, 512), (64, 1024), (256, 1024))  # (fresh prompt tokens, cached prefix tokens)
DECODE_OUTPUT_TOKENS = 48
# Through the service, fresh prompts queue at the one prefill worker and their streams start seconds apart (16
# prompts of 512 tokens: first tokens in waves up to 9.8 s after sending, 2026-12-01), so the shapes as deployed
# stop at 8 streams, each long enough to outlast the last one's start.
DEPLOYED_DECODE_SHAPES = tuple((seqs, prompt) for seqs in (1, 4, 8) for prompt in (64, 512))
DEPLOYED_OUTPUT_TOKENS = 512
# Each shape as deployed is timed this many times, the shapes in turn, and the median kept: one timing of one
# stream through the service read 8.6 ms a step in one run and 10.6 in the one before (2026-12-02, the engine
# alone 10.3 both times), and every simulated step of the run followed it.
DEPLOYED_REPEATS = 3
REPEATS = 3  # prefill timings per length; the median is kept
REQUEST_WARM_UPS = 2  # prefix hits sent before those timed: the first steps at a new shape are slow on CPU
REQUEST_REPEATS = 8  # prefix hits timed; the median is kept
FEATURES = ("base_ms", "prefill_step_ms", "prefill_ms_per_token", "prefill_ms_per_token2",
            "prefill_ms_per_context_pair", "decode_ms_per_seq", "decode_ms_per_context_token")  # fmt: skip


@dataclass(frozen=True)
class StepTiming:
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    ms: float
    prefill_context_pairs: int = 0  # prompt tokens computed x tokens cached before them

    def features(self) -> list[float]:
        p = self.prefill_tokens
        return [1.0, float(p > 0), p, p * p, self.prefill_context_pairs, self.decode_seqs, self.context_tokens]


@dataclass(frozen=True)
class EngineFigures:
    timings: list[StepTiming]
    kv_bytes_per_token: int
    kv_blocks: int  # the engine's KV pool, for a simulated engine of the same size
    block_size: int


def fit(timings: list[StepTiming]) -> dict[str, float]:
    """Least squares over the step timings, every coefficient ≥ 0: a feature fitted negative is dropped."""
    import numpy as np

    kept = list(range(len(FEATURES)))
    rows = np.array([t.features() for t in timings])
    ms = np.array([t.ms for t in timings])
    while True:
        scale = np.maximum(np.abs(rows[:, kept]).max(axis=0), 1e-12)  # columns on one scale: P² is huge
        solution = np.linalg.lstsq(rows[:, kept] / scale, ms, rcond=None)[0] / scale
        negative = [kept[i] for i, value in enumerate(solution) if value < 0]
        if not negative:
            break
        kept.remove(min(negative, key=lambda i: solution[kept.index(i)]))
    coefficients = dict.fromkeys(FEATURES, 0.0)
    coefficients.update({FEATURES[i]: float(value) for i, value in zip(kept, solution, strict=True)})
    return coefficients


def profile_of(
    figures: EngineFigures, link_bytes_per_s: float, name: str, model: str, timed: str = "the engine alone"
) -> HardwareProfile:
    return HardwareProfile(
        name=name,
        source=f"measured by pdserve bench simulator on this machine ({time.strftime('%Y-%m-%d')}): {model}, "
        f"{len(figures.timings)} step timings ({timed}) fitted (bench/engine_profile.py); link given as "
        f"{link_bytes_per_s / 1e9:g} GB/s",
        kv_bytes_per_token=figures.kv_bytes_per_token,
        link_bytes_per_s=link_bytes_per_s,
        **fit(figures.timings),
    )


def measure(config: EngineConfig) -> EngineFigures:
    """The step timings of the config's engine, in a fresh process of its own."""
    return call_in_fresh_process(_measure_in_process, config)


def _measure_in_process(config: EngineConfig) -> EngineFigures:
    import torch

    from engine.engine import Engine

    engine = Engine(config)
    try:
        timings = asyncio.run(_timings(engine))
        layout = engine.kv_layout()
        per_token = math.prod(layout.block_shape) // layout.block_size * len(layout.layer_names)
        element = getattr(torch, layout.dtype.removeprefix("torch.")).itemsize
        return EngineFigures(timings, per_token * element, engine.stats().kv_blocks_total, layout.block_size)
    finally:
        engine.shutdown()


async def _timings(engine) -> list[StepTiming]:
    from engine.types import GenerateRequest, SamplingOptions

    rng = random.Random(0)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(2, engine.vocab_size) for _ in range(n)]

    async def token_times(request_id: str, ids: list[int], max_tokens: int) -> list[float]:
        times = []
        sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for delta in engine.generate(GenerateRequest(request_id, ids, sampling)):
            times += [time.perf_counter()] * len(delta.token_ids)
        return times

    await token_times("warm-up", fresh(max(PREFILL_TOKENS)), 4)  # the first step at a new shape is slow on CPU
    timings = []
    for tokens in PREFILL_TOKENS:
        ttfts = []
        for i in range(REPEATS):
            began = time.perf_counter()
            ttfts.append(1000 * ((await token_times(f"prefill-{tokens}-{i}", fresh(tokens), 1))[0] - began))
        timings.append(StepTiming(tokens, 0, 0, statistics.median(ttfts)))
    for tokens, cached in CACHED_PREFIX_SHAPES:
        prefix = fresh(cached)  # a whole number of blocks: every one of them a hit below
        await token_times(f"prefix-{tokens}-{cached}", prefix + fresh(16), 1)
        ttfts = []
        for i in range(REPEATS):
            began = time.perf_counter()
            ids = prefix + fresh(tokens)
            ttfts.append(1000 * ((await token_times(f"cached-{tokens}-{cached}-{i}", ids, 1))[0] - began))
        timings.append(StepTiming(tokens, 0, 0, statistics.median(ttfts), tokens * cached))
    for batch, prompt in DECODE_SHAPES:
        runs = await asyncio.gather(*(token_times(f"decode-{batch}-{prompt}-{i}", fresh(prompt),
                                                  DECODE_OUTPUT_TOKENS) for i in range(batch)))  # fmt: skip
        timings.append(decode_step(batch, prompt, DECODE_OUTPUT_TOKENS, runs))
    return timings


def decode_step(batch: int, prompt: int, output: int, runs: list[list[float]]) -> StepTiming:
    """One decode shape's step from its streams' token times: while all of them run, each stream's tokens in
    that window over the steps between its first and last, median over the streams."""
    all_running, first_done = max(run[0] for run in runs), min(run[-1] for run in runs)
    steps = []
    for run in runs:
        window = [t for t in run if all_running <= t <= first_done]
        if len(window) > 1 and window[-1] > window[0]:
            steps.append((window[-1] - window[0]) / (len(window) - 1))
    if not steps:
        raise RuntimeError(f"{batch} streams of {prompt}-token prompts never decoded all at once: no step to time")
    return StepTiming(0, batch, batch * (prompt + output // 2), 1000 * statistics.median(steps))


async def decode_timings_as_deployed(http_url: str, grpc_address: str, vocab_size: int) -> list[StepTiming]:
    """``DEPLOYED_DECODE_SHAPES`` through a running service (gRPC, fresh prompts, ``DEPLOYED_OUTPUT_TOKENS`` each): the
    decode engine's steps as the client sees them, with the serving processes working beside it."""
    from bench.load import LoadSpec, run_load
    from bench.workloads import Turn, Workload

    rng = random.Random(1)
    timings: dict[tuple[int, int], list[StepTiming]] = {}
    # The first streams of a fresh service run slow (one stream stepped in 16 ms, then 9.6 ms: 2026-12-01): the
    # first shape is run once more, untimed, before any is kept.
    for number, (batch, prompt) in enumerate(DEPLOYED_DECODE_SHAPES[:1] + DEPLOYED_DECODE_SHAPES * DEPLOYED_REPEATS):
        sessions = [[Turn([rng.randrange(2, vocab_size) for _ in range(prompt)], DEPLOYED_OUTPUT_TOKENS)]
                    for _ in range(batch)]  # fmt: skip
        workload = Workload(f"decode-{batch}x{prompt}", sessions)
        records, _ = await run_load(http_url, grpc_address, workload, LoadSpec(api="grpc", users=batch, progress=False))
        short = [r.error or f"{r.output_tokens} tokens" for r in records if r.output_tokens != DEPLOYED_OUTPUT_TOKENS]
        if short:
            raise RuntimeError(f"decode shape {batch}x{prompt}: {len(short)} streams failed or fell short: {short[0]}")
        runs = [list(itertools.accumulate(r.itl_s, initial=r.start_s + r.ttft_s)) for r in records]
        if number > 0:
            timings.setdefault((batch, prompt), []).append(decode_step(batch, prompt, DEPLOYED_OUTPUT_TOKENS, runs))
    return [median_timing(repeats) for repeats in timings.values()]


async def prefix_hits_as_deployed(
    http_url: str, grpc_address: str, vocab_size: int, shape: tuple[int, int], output_tokens: int
) -> list[float]:
    """The decode worker's own time to the first token (ms, the router's ``worker`` part) of ``REQUEST_REPEATS``
    prompts of ``shape`` (fresh prompt tokens, cached prefix tokens), sent one at a time through a running
    service after the one that puts their prefix on a decode worker and ``REQUEST_WARM_UPS`` more; only those
    computed there on the prefix are kept.

    Each asks for ``output_tokens``, as the requests it stands for do: one that goes on decoding has its first
    token later (the engine core that sends it out shares the rank's core with the next step). 2026-12-05, the
    bench model through one service, 24 hits each: 35.8 ms for 1 token, 39.8 ms for 32 (medians)."""
    from bench.load import LoadSpec, run_load
    from bench.workloads import Turn, Workload

    rng = random.Random(2)
    fresh, cached = shape
    prefix = [rng.randrange(2, vocab_size) for _ in range(cached)]
    sessions = [[Turn(prefix + [rng.randrange(2, vocab_size) for _ in range(fresh)], output_tokens)]
                for _ in range(1 + REQUEST_WARM_UPS + REQUEST_REPEATS)]  # fmt: skip
    records, _ = await run_load(http_url, grpc_address, Workload("prefix-hits", sessions),
                                LoadSpec(api="grpc", users=1, progress=False))  # fmt: skip
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"prefix hits: {len(failed)} requests failed: {failed[0]}")
    timed = records[1 + REQUEST_WARM_UPS :]
    hits = [r for r in timed if r.prompt_worker == r.decode_worker and r.cached_tokens >= cached]
    if len(hits) * 2 < len(timed):
        raise RuntimeError(f"prefix hits: {len(timed) - len(hits)} of {len(timed)} were not computed on the decode "
                           f"worker holding their {cached}-token prefix: no request time to measure")  # fmt: skip
    return [1000 * r.ttft_parts_s["worker"] for r in hits]


def with_request_time(profile: HardwareProfile, worker_ms: list[float], shape: tuple[int, int]) -> HardwareProfile:
    """``profile`` with ``request_ms``: the median of the worker's times to the first token of prefix hits of
    ``shape`` (``prefix_hits_as_deployed``) less the step the profile gives one; none where the step is longer."""
    fresh, cached = shape
    step_ms = 1000 * profile.step_s(fresh, 0, 0, fresh * cached)
    return replace(profile, request_ms=max(0.0, statistics.median(worker_ms) - step_ms))


def median_timing(repeats: list[StepTiming]) -> StepTiming:
    """One shape's timings as one: the median of their times."""
    return replace(repeats[0], ms=statistics.median(t.ms for t in repeats))


def write_profile(profile: HardwareProfile, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json() + "\n")
    return path
