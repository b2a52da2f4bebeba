"""Make a small Hugging Face model directory with random weights, offline.

There is no model hub on development and CI machines, so tests and the local
service build their model here and load it through vLLM's real loading code.
Weights are random but drawn with a large init scale: the default 0.02 gives
near-flat logits, so greedy decoding would hinge on float rounding and two
correct engines could disagree. A wider init makes the arg-max margin large.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.errors import EngineConfigError

Arch = Literal["llama", "mistral", "qwen2"]
ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2")

BOS, EOS = "<s>", "</s>"
# Tools as Hermes-format models show them (so vLLM's ``hermes`` parser reads this model's calls); a chat
# without tools renders as plain role-tagged turns.
CHAT_TEMPLATE = (
    '{% if tools %}<|system|>\nCall a tool as <tool_call>{"name": ..., "arguments": {...}}</tool_call>:\n'
    "<tools>{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>" + EOS + "\n{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}" + EOS + "\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Docstrings of these standard-library modules (and their members) are the
# tokenizer's training text: always on disk, so no download is ever needed.
_CORPUS_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "functools",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "re",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "zipfile",
)
_CORPUS_EXTRA = "Zürich, naïve café, 東京, Ελληνικά, emoji 🙂 — multi-byte text for the byte-level BPE.\n"


@dataclass(frozen=True)
class ModelShape:
    arch: Arch = "llama"
    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int | None = None
    max_position_embeddings: int = 4096
    init_scale: float = 0.5
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads


TINY_SHAPE = ModelShape()
BENCH_SHAPE = ModelShape(vocab_size=8192, hidden_size=512, layers=8, heads=8, kv_heads=4)
PRESETS = {"tiny": TINY_SHAPE, "bench": BENCH_SHAPE}


def supported_head_dims() -> list[int]:
    """Head sizes vLLM's CPU attention backend runs (read from vLLM, not copied)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.get_supported_head_sizes()


def validate_shape(shape: ModelShape) -> None:
    if shape.arch not in ARCHS:
        raise EngineConfigError("arch", f"must be one of {', '.join(ARCHS)}, got {shape.arch!r}")
    for name in ("vocab_size", "hidden_size", "layers", "heads", "kv_heads"):
        if getattr(shape, name) < 1:
            raise EngineConfigError(name, f"must be >= 1, got {getattr(shape, name)}")
    if shape.hidden_size % shape.heads:
        raise EngineConfigError("heads", f"hidden_size {shape.hidden_size} is not divisible by heads {shape.heads}")
    if shape.heads % shape.kv_heads:
        raise EngineConfigError("kv_heads", f"heads {shape.heads} is not divisible by kv_heads {shape.kv_heads}")
    supported = supported_head_dims()
    if shape.head_dim not in supported:
        raise EngineConfigError(
            "hidden_size/heads",
            f"head_dim {shape.head_dim} is not supported by vLLM's CPU attention; supported head sizes: {supported}",
        )
    if shape.vocab_size < 300:
        raise EngineConfigError("vocab_size", f"must be >= 300 (256 bytes + merges + specials), got {shape.vocab_size}")


def make_model(out_dir: str | Path, shape: ModelShape = TINY_SHAPE) -> Path:
    """Write config, weights, tokenizer and generation config into ``out_dir``."""
    validate_shape(shape)
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(shape.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)

    config = _hf_config(shape, bos_id, eos_id)
    torch.manual_seed(shape.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _scale_init(model, shape)
    model.save_pretrained(out, safe_serialization=True)

    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": EOS,
                "add_bos_token": False,
                "model_max_length": shape.max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False}, indent=2)
    )
    return out


def _hf_config(shape: ModelShape, bos_id: int, eos_id: int):
    from transformers import AutoConfig

    intermediate = shape.intermediate_size or 3 * shape.hidden_size
    extra = {"sliding_window": None} if shape.arch in ("mistral", "qwen2") else {}
    return AutoConfig.for_model(
        shape.arch,
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        initializer_range=shape.init_scale / math.sqrt(shape.hidden_size),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        **extra,
    )


def _scale_init(model, shape: ModelShape) -> None:
    """Widen the output projection so greedy arg-max margins dwarf float rounding."""
    import torch

    generator = torch.Generator().manual_seed(shape.seed + 1)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=generator) * (4.0 / math.sqrt(shape.hidden_size)))


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def _corpus():
    import importlib

    yield _CORPUS_EXTRA
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        yield module.__doc__ or ""
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            if doc:
                yield doc


if __name__ == "__main__":  # python -m engine.tiny_model DIR PRESET: how engine/model_source.py makes one
    make_model(sys.argv[1], PRESETS[sys.argv[2]])
