"""Where the served model comes from: the configured directory or Hugging Face repo, or a tiny one made on the spot.

Nodes of a cluster need not share a filesystem, so the composition hands every replica a ``ModelSource``
(engine/model_source.py), never a directory found on the builder's node: each replica makes the model
present on its own node. The builder itself reads only the model's ``config.json``, on its own node.
"""

from __future__ import annotations

import json
from typing import Any

from engine.model_source import CONFIG_FILES, ModelSource, TinyModel, ensure_model, on_this_node, parse_model
from pdserve.config import PdserveConfig

# The tiny models' directories under model_cache_dir, by engine/tiny_model.py preset.
TINY_MODELS = {"tiny": "pdserve-tiny-llama", "bench": "pdserve-bench-llama"}


def model_source(config: PdserveConfig, preset: str = "tiny") -> ModelSource:
    """``engine.model`` as given, or (none given) the tiny model of ``preset`` under ``model_cache_dir``."""
    engine = config.engine
    if engine.model is None:
        return TinyModel(preset, config.model_cache_dir / TINY_MODELS[preset])
    return parse_model(engine.model, engine.revision, engine.download_dir)


def model_config(config: PdserveConfig) -> dict[str, Any]:
    """The model's ``config.json``, made present on this node first (for a hub repo, only that file)."""
    return json.loads((ensure_model(model_source(config), CONFIG_FILES) / "config.json").read_text())


def resolve_model(config: PdserveConfig, preset: str = "tiny") -> PdserveConfig:
    """``config`` to run an engine in this process (``generate --local``, the benchmarks): ``engine.model`` the
    model's whole directory on this node, made or downloaded here when absent."""
    return config.model_copy(update={"engine": on_this_node(config.engine, model_source(config, preset))})
