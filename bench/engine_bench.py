"""Engine benchmark: pdserve's engine interface against vLLM's offline ``LLM.generate``.

Both sides run from the same engine arguments, in alternating rounds (a
pdserve round, then a vLLM round, on the same fresh prompts, each in a fresh
process of this invocation), so machine noise hits both alike; medians are reported. Each engine
first runs the workload once untimed: vLLM's first batches at a new shape are
slow on CPU, and the measurement is of steady state.

- ``wrapper_vs_vllm_throughput``: generated tokens/s of N concurrent streamed
  requests through ``Engine.generate`` divided by ``LLM.generate``'s (target >= 0.9).
- ``ttft_speedup_prefix_hit``: TTFT of a cold 2,048-token prompt divided by the
  TTFT of one whose first 1,920 tokens are cached (target >= 5).
- ``engine_start_s``: seconds from ``Engine(config)`` to ready in a fresh
  process, as a worker starts: vLLM's import, model load, KV cache, warm-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.engine_process import call_in_fresh_process
from bench.report import Row, report
from engine.config import EngineConfig
from engine.engine import Engine
from engine.types import GenerateRequest, SamplingOptions
from engine.vllm_args import apply_vllm_environment, vllm_engine_args

PROMPT_TOKENS = 256
OUTPUT_TOKENS = 128
LONG_PROMPT = 2048
CACHED_PREFIX = 1920


def run_engine_bench(config: EngineConfig, requests: int = 32, repeats: int = 3, json_path: Path | None = None) -> dict:
    config = config.model_copy(update={"max_model_len": config.max_model_len or LONG_PROMPT + 256})
    vocab_size = json.loads((Path(config.model) / "config.json").read_text())["vocab_size"]
    starts, ours, theirs, cold_ttft, warm_ttft = [], [], [], [], []
    for round_no in range(repeats):
        rng = random.Random(round_no)
        warmup, prompts = ([_random_prompt(rng, vocab_size, PROMPT_TOKENS) for _ in range(requests)] for _ in range(2))
        # Each side in a fresh process, as a worker runs it: vLLM binds its threads to cores per
        # process, and a second engine in one process runs slower than the first.
        start_s, tokens_per_s, cold, warm = call_in_fresh_process(_pdserve_side, config, warmup, prompts, round_no)
        theirs.append(call_in_fresh_process(_vllm_side, config, warmup, prompts))
        starts.append(start_s)
        ours.append(tokens_per_s)
        cold_ttft.append(cold)
        warm_ttft.append(warm)

    results = {
        "wrapper_vs_vllm_throughput": statistics.median(o / t for o, t in zip(ours, theirs, strict=True)),
        "ttft_speedup_prefix_hit": statistics.median(cold_ttft) / statistics.median(warm_ttft),
        "engine_start_s": statistics.median(starts),
        "pdserve_tokens_per_s": statistics.median(ours),
        "vllm_tokens_per_s": statistics.median(theirs),
        "ttft_cold_ms": 1000 * statistics.median(cold_ttft),
        "ttft_prefix_hit_ms": 1000 * statistics.median(warm_ttft),
        "pdserve_tokens_per_s_rounds": ours,
        "vllm_tokens_per_s_rounds": theirs,
        "requests": requests,
        "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "repeats": repeats,
        "model": str(config.model),
        "dtype": config.dtype,
    }
    report(_rows(results), results, json_path)
    return results


def _random_prompt(rng: random.Random, vocab_size: int, n: int) -> list[int]:
    return [rng.randrange(2, vocab_size) for _ in range(n)]


def _greedy(max_tokens: int) -> SamplingOptions:
    return SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _pdserve_side(config: EngineConfig, warmup, prompts, seed: int) -> tuple[float, float, float, float]:
    t0 = time.perf_counter()
    engine = Engine(config)
    start_s = time.perf_counter() - t0
    try:
        asyncio.run(_engine_throughput(engine, warmup))
        tokens_per_s = asyncio.run(_engine_throughput(engine, prompts))
        cold, warm = asyncio.run(_prefix_ttft(engine, random.Random(seed)))
    finally:
        engine.shutdown()
    return start_s, tokens_per_s, cold, warm


async def _engine_throughput(engine: Engine, prompts: list[list[int]]) -> float:
    async def one(i: int, ids: list[int]) -> int:
        count = 0
        async for delta in engine.generate(GenerateRequest(f"tput-{i}", ids, _greedy(OUTPUT_TOKENS))):
            count += len(delta.token_ids)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    return sum(counts) / (time.perf_counter() - start)


def _vllm_side(config: EngineConfig, warmup: list[list[int]], prompts: list[list[int]]) -> float:
    from vllm import LLM, EngineArgs, SamplingParams

    rpc_dir = tempfile.TemporaryDirectory(prefix="pdserve-bench-vllm-")
    apply_vllm_environment(config, rpc_dir.name)
    args = vllm_engine_args(config, None)
    defaults = EngineArgs(model=args.model)
    kwargs = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(EngineArgs)
        if getattr(args, f.name) != getattr(defaults, f.name) or f.name == "model"
    }
    llm = LLM(**kwargs)
    try:
        params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": ids} for ids in warmup], params, use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        rpc_dir.cleanup()


async def _ttft(engine: Engine, request_id: str, ids: list[int]) -> float:
    start = time.perf_counter()
    async for _ in engine.generate(GenerateRequest(request_id, ids, _greedy(1))):
        return time.perf_counter() - start
    raise RuntimeError("no output")


async def _prefix_ttft(engine: Engine, rng: random.Random, samples: int = 3) -> tuple[float, float]:
    cold, warm = [], []
    for i in range(samples):
        cold.append(await _ttft(engine, f"cold-{i}", _random_prompt(rng, engine.vocab_size, LONG_PROMPT)))
        prefix = _random_prompt(rng, engine.vocab_size, CACHED_PREFIX)
        suffix = LONG_PROMPT - CACHED_PREFIX
        await _ttft(engine, f"fill-{i}", prefix + _random_prompt(rng, engine.vocab_size, suffix))
        warm.append(await _ttft(engine, f"warm-{i}", prefix + _random_prompt(rng, engine.vocab_size, suffix)))
    return statistics.median(cold), statistics.median(warm)


def _rows(results: dict) -> list[Row]:
    rows = [
        ("wrapper_vs_vllm_throughput", f"{results['wrapper_vs_vllm_throughput']:.3f}", ">= 0.9"),
        ("  pdserve tokens/s", f"{results['pdserve_tokens_per_s']:.1f}", ""),
        ("  vLLM LLM.generate tokens/s", f"{results['vllm_tokens_per_s']:.1f}", ""),
        ("ttft_speedup_prefix_hit", f"{results['ttft_speedup_prefix_hit']:.2f}", ">= 5"),
        ("  TTFT cold (ms)", f"{results['ttft_cold_ms']:.1f}", ""),
        ("  TTFT 1,920 cached (ms)", f"{results['ttft_prefix_hit_ms']:.1f}", ""),
        ("engine_start_s", f"{results['engine_start_s']:.2f}", ""),
    ]
    return rows
