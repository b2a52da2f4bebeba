"""Where the served model comes from: the configured directory, or a tiny one made on the spot."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from engine.tiny_model import TINY_SHAPE, ModelShape, make_model
from pdserve.config import PdserveConfig

DEFAULT_MODEL_NAME = "pdserve-tiny-llama"


def resolve_model(
    config: PdserveConfig, shape: ModelShape = TINY_SHAPE, name: str = DEFAULT_MODEL_NAME
) -> PdserveConfig:
    """Return ``config`` with ``engine.model`` set, making (once) a tiny model when none is given."""
    if config.engine.model is not None:
        return config
    target = config.model_cache_dir / name
    if not (target / "config.json").is_file():
        config.model_cache_dir.mkdir(parents=True, exist_ok=True)
        # Made aside and renamed into place, so a half-written model is never picked up.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=config.model_cache_dir))
        make_model(staging, shape)
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(staging, ignore_errors=True)
    engine = config.engine.model_copy(update={"model": target})
    return config.model_copy(update={"engine": engine})
