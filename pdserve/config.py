"""pdserve's one config schema, read from a YAML file, then ``PDSERVE_*`` env, then flags.

Later sources win. Nested fields use ``__`` in env names, e.g.
``PDSERVE_ENGINE__BLOCK_SIZE=32`` sets ``engine.block_size``; flags use
dotted keys (``--set engine.block_size=32``). Every error names the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.config import EngineConfig
from router.config import RouterConfig

ENV_PREFIX = "PDSERVE_"


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every bad field."""


class PdserveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "pdserve" / "models",
        description="where the tiny model is made when no model directory is configured",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


def load_config(
    path: Path | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> PdserveConfig:
    """Merge file < env < overrides (dotted keys) and validate once."""
    merged: dict[str, Any] = {}
    if path is not None:
        merged = _read_file(path)
    for key, value in _env_items(env or {}):
        _set_dotted(merged, key, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(merged, key, value)
    try:
        return PdserveConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``engine.block_size=32`` → (``engine.block_size``, 32), the value read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    return key.strip(), yaml.safe_load(raw)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def _env_items(env: Mapping[str, str]):
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            yield name[len(ENV_PREFIX) :].lower().replace("__", "."), value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "config"
        got = (
            f" (got {error['input']!r})" if error["type"] != "missing" and not isinstance(error["input"], dict) else ""
        )
        lines.append(f"{field}: {error['msg']}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)
