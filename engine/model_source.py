"""Where the served model comes from, described the same on every node, and made present on this one.

pdserve runs on clusters whose nodes do not share a filesystem: the app is built on one node and its
replicas run on others. So a replica is never handed a directory the builder found on its own node; it
is handed a ``ModelSource`` (what the model is) and calls ``ensure_model`` on its own node before it
reads anything: a directory every node has, a Hugging Face repo each node downloads into its own cache,
or the tiny model, made on each node from a fixed seed (byte-identical everywhere, so KV and block hashes
stay interchangeable between nodes).

Torch-free, as the router imports it: the tiny model is made in a child process, so a router replica that
makes it never loads torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import EngineConfigError

if TYPE_CHECKING:
    from engine.config import EngineConfig

# What a process that reads only the model's figures (context length, vocabulary, heads) needs.
CONFIG_FILES = ("config.json",)
_MAKE_TINY_TIMEOUT_S = 300  # a few seconds here; a loaded node's first torch import is the slow part


@dataclass(frozen=True)
class LocalModel:
    """A model directory at the same path on every node (a shared or a copied filesystem)."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.expanduser().resolve().name


@dataclass(frozen=True)
class HubModel:
    """A Hugging Face repo, downloaded on each node into that node's Hugging Face cache."""

    repo_id: str
    revision: str | None = None  # branch, tag or commit; none: main. A commit keeps every node on the same weights
    cache_dir: Path | None = None  # none: the node's HF_HUB_CACHE (HF_HOME/hub)

    @property
    def name(self) -> str:
        return self.repo_id.rsplit("/", 1)[1]


@dataclass(frozen=True)
class TinyModel:
    """The tiny model of ``engine/tiny_model.py``'s ``preset``, made in ``directory`` on each node that lacks it.

    ``directory`` may start with ``~``: each node's own home, so nodes with different homes each make their own."""

    preset: str
    directory: Path

    @property
    def name(self) -> str:
        return self.directory.name


ModelSource = LocalModel | HubModel | TinyModel


def parse_model(value: str, revision: str | None = None, cache_dir: Path | None = None) -> LocalModel | HubModel:
    """``engine.model`` as given: an existing directory, else a Hugging Face repo id (``org/name``), as vLLM
    reads ``--model``. ``ValueError`` for anything else, and for a directory without ``config.json``."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{value} is not a model directory (no config.json)")
        return LocalModel(Path(value))
    if path.exists():
        raise ValueError(f"{value} is a file, not a model directory")
    if value.count("/") == 1 and _valid_repo_id(value):
        return HubModel(value, revision, cache_dir)
    raise ValueError(
        f"{value!r} is neither a model directory on this node nor a Hugging Face repo id (org/name, e.g. "
        "Qwen/Qwen2.5-7B-Instruct)"
    )


def _valid_repo_id(value: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def ensure_model(source: ModelSource, files: Sequence[str] | None = None) -> Path:
    """The model's directory on this node, made or downloaded here first when absent.

    ``files``: the only files this process reads (the router's tokenizer, the builder's ``config.json``):
    a hub repo fetches just those, so a CPU node never downloads the weights; a directory and the tiny
    model are whole either way. ``EngineConfigError`` naming ``engine.model`` when it cannot be had."""
    if isinstance(source, LocalModel):
        path = source.path.expanduser()
        if not (path / "config.json").is_file():
            raise EngineConfigError(
                "engine.model",
                f"{path} is not a model directory on this node ({os.uname().nodename}): a directory must be on "
                "every node that runs a replica; or give a Hugging Face repo id (org/name), downloaded on each",
            )
        return path
    if isinstance(source, HubModel):
        return _download(source, files)
    return _make_tiny(source)


def pin_revision(source: ModelSource, snapshot: Path) -> ModelSource:
    """A hub source pinned to the commit of ``snapshot`` (a directory ``ensure_model`` gave for it): replicas
    that start later, on other nodes, load that commit, not whatever the branch points to by then, so every
    pool serves the same weights under one name and KV stays interchangeable. Other sources as they are."""
    if not isinstance(source, HubModel):
        return source
    return HubModel(source.repo_id, snapshot.name, source.cache_dir)  # a snapshot directory is named by its commit


def on_this_node(engine: EngineConfig, source: ModelSource) -> EngineConfig:
    """``engine`` to run in this process: its model the source's whole directory on this node, its served name
    the one the composition pinned (else the source's: a hub snapshot's directory is named by its commit)."""
    return engine.model_copy(update={"model": str(ensure_model(source)), "model_id": engine.model_id or source.name})


def _download(source: HubModel, files: Sequence[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    revision = f" (revision {source.revision})" if source.revision else ""
    try:
        snapshot = Path(
            snapshot_download(
                source.repo_id,
                revision=source.revision,
                cache_dir=source.cache_dir.expanduser() if source.cache_dir else None,
                allow_patterns=list(files) if files else None,
            )
        )
    except (OSError, ValueError) as exc:  # not found, gated, offline with nothing cached, a bad revision
        raise EngineConfigError(
            "engine.model", f"Hugging Face repo {source.repo_id!r}{revision} cannot be had on this node: {exc}"
        ) from exc
    if not (snapshot / "config.json").is_file():
        raise EngineConfigError(
            "engine.model", f"Hugging Face repo {source.repo_id!r}{revision} has no config.json: not a model vLLM loads"
        )
    return snapshot


def _make_tiny(source: TinyModel) -> Path:
    target = source.directory.expanduser()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Made aside and renamed into place, so a half-written model is never picked up; in a child process, so
    # the caller (a router replica) never loads torch.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    command = [sys.executable, "-m", "engine.tiny_model", str(staging), source.preset]
    try:
        made = subprocess.run(command, capture_output=True, text=True, timeout=_MAKE_TINY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        shutil.rmtree(staging, ignore_errors=True)
        raise EngineConfigError("engine.model", f"making the tiny model took over {_MAKE_TINY_TIMEOUT_S} s") from None
    if made.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise EngineConfigError(
            "engine.model", f"the tiny model ({source.preset}) could not be made in {target}: {made.stderr[-2000:]}"
        )
    try:
        staging.rename(target)
    except OSError:  # another process on this node made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
