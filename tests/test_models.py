"""The served model on every node that needs it: a directory, a Hugging Face repo, or the tiny default made there.

A cluster's nodes need not share a filesystem: the app is built on one node and each replica makes the model
present on its own. A "node" here is a home directory of its own (the tiny default lives under ``~``), and a
fresh process with its node's environment (the Hugging Face cache and offline switch are read at import).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import EngineConfigError
from engine.model_source import HubModel, LocalModel, TinyModel, ensure_model, on_this_node
from pdserve.config import ConfigError, load_config
from pdserve.models import model_source

TINY_DIR = Path(".cache/pdserve/models/pdserve-tiny-llama")
REPO, SNAPSHOT = "acme/tiny-chat", "0123456789abcdef0123456789abcdef01234567"
# The model a replica's process resolves, printed: what a replica on a node with this environment would load.
RESOLVE = (
    "import os; from engine.model_source import ensure_model; from pdserve.config import load_config; "
    "from pdserve.models import model_source; print(ensure_model(model_source(load_config(env=os.environ))))"
)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def builder_node(tmp_path_factory):
    """The node that builds the app: the source it hands every replica, and the tiny default it made for itself."""
    home = tmp_path_factory.mktemp("node-a")
    with pytest.MonkeyPatch.context() as node:
        node.setenv("HOME", str(home))
        source = model_source(load_config())
        made = ensure_model(source)
    return source, made


@pytest.fixture(scope="module")
def replica_node(tmp_path_factory, builder_node):
    """A second node, another home, where a replica starts with the builder's source: (its home, whether the
    model was there before, the engine config the replica runs)."""
    source, _ = builder_node
    home = tmp_path_factory.mktemp("node-b")
    with pytest.MonkeyPatch.context() as node:
        node.setenv("HOME", str(home))
        there_before = (home / TINY_DIR).exists()
        engine = on_this_node(load_config().engine, source)
    return home, there_before, engine


def test_the_tiny_default_is_described_not_located_so_each_node_resolves_it_under_its_own_home(builder_node):
    source, made = builder_node
    assert source == TinyModel("tiny", Path("~") / TINY_DIR)
    assert made.name == "pdserve-tiny-llama" and (made / "config.json").is_file()


def test_a_replica_makes_the_tiny_default_on_its_own_node_when_absent(replica_node):
    home, there_before, engine = replica_node
    assert not there_before
    assert Path(engine.model) == home / TINY_DIR and (home / TINY_DIR / "model.safetensors").is_file()
    assert engine.served_model_id == "pdserve-tiny-llama"


def test_the_tiny_default_made_on_a_second_node_is_byte_identical_to_the_first(builder_node, replica_node):
    _, first = builder_node
    second = Path(replica_node[2].model)
    assert second != first
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(second / name) == digest(first / name), name


def test_a_model_already_on_the_node_is_used_as_it_is(builder_node):
    source, made = builder_node
    before = (made / "model.safetensors").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as node:
        node.setenv("HOME", str(made.parents[3]))
        assert ensure_model(source) == made
    assert (made / "model.safetensors").stat().st_mtime_ns == before


def test_engine_model_is_a_directory_or_a_hub_repo_id_and_anything_else_is_refused_naming_it(model_dir, tmp_path):
    assert model_source(load_config(overrides={"engine.model": str(model_dir)})) == LocalModel(model_dir)
    assert model_source(load_config(overrides={"engine.model": REPO})) == HubModel(REPO)
    (tmp_path / "weights.bin").write_bytes(b"")
    for value in ("tiny-chat", "/no/such/dir", "acme/tiny/chat", str(tmp_path / "weights.bin")):
        with pytest.raises(ConfigError, match=r"engine\.model"):
            load_config(overrides={"engine.model": value})


def test_a_repo_is_served_under_its_name_part_and_pinned_to_a_revision_and_cache_when_given(tmp_path):
    config = load_config(overrides={"engine.model": REPO, "engine.revision": "v1", "engine.download_dir": tmp_path})
    assert model_source(config) == HubModel(REPO, "v1", tmp_path)
    assert config.engine.served_model_id == model_source(config).name == "tiny-chat"


@pytest.mark.parametrize("field", ["engine.revision", "engine.download_dir"])
def test_revision_and_download_dir_are_refused_where_nothing_is_downloaded(model_dir, field):
    for model in (None, str(model_dir)):
        with pytest.raises(ConfigError, match=re.escape(field) + ": .*Hugging Face repo id"):
            load_config(overrides={"engine.model": model, field: "x"})


def test_a_directory_missing_on_a_replicas_node_is_a_clear_error(tmp_path):
    with pytest.raises(EngineConfigError, match=r"engine\.model: .*not a model directory on this node .*every node"):
        ensure_model(LocalModel(tmp_path / "elsewhere"))


@pytest.fixture
def hf_home(tmp_path, make_tiny_model):
    """A Hugging Face cache laid out as the hub client writes it, holding a tiny model as ``acme/tiny-chat``."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-chat"
    shutil.copytree(make_tiny_model("llama"), repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return tmp_path / "hf"


def resolve_on_a_node(env: dict[str, str]) -> subprocess.CompletedProcess:
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", **env}  # nothing may download in a test
    return subprocess.run([sys.executable, "-c", RESOLVE], capture_output=True, text=True, env=offline, timeout=120)


def test_a_repo_id_resolves_to_its_snapshot_in_the_nodes_hugging_face_cache(hf_home):
    result = resolve_on_a_node({"HF_HOME": str(hf_home), "PDSERVE_ENGINE__MODEL": REPO})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == hf_home / "hub" / "models--acme--tiny-chat" / "snapshots" / SNAPSHOT


def test_download_dir_names_the_cache_a_repo_is_found_in(hf_home, tmp_path):
    env = {"HF_HOME": str(tmp_path / "empty"), "PDSERVE_ENGINE__MODEL": REPO,
           "PDSERVE_ENGINE__DOWNLOAD_DIR": str(hf_home / "hub")}  # fmt: skip
    result = resolve_on_a_node(env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).name == SNAPSHOT


def test_a_repo_absent_offline_is_a_clear_error_naming_engine_model(hf_home):
    result = resolve_on_a_node({"HF_HOME": str(hf_home), "PDSERVE_ENGINE__MODEL": "acme/absent"})
    assert result.returncode != 0
    assert "engine.model: Hugging Face repo 'acme/absent' cannot be had on this node" in result.stderr


def test_replicas_load_the_commit_the_builder_resolved_after_the_branch_moves(hf_home, tmp_path):
    from engine.model_source import pin_revision

    repo = hf_home / "hub" / "models--acme--tiny-chat"
    builder_snapshot = repo / "snapshots" / SNAPSHOT
    pinned = pin_revision(HubModel(REPO), builder_snapshot)
    newer = "f" * 40
    shutil.copytree(builder_snapshot, repo / "snapshots" / newer)
    (repo / "refs" / "main").write_text(newer)  # main moved on after the app was built

    result = resolve_on_a_node({"HF_HOME": str(hf_home), "PDSERVE_ENGINE__MODEL": REPO,
                                "PDSERVE_ENGINE__REVISION": pinned.revision})  # fmt: skip
    assert pinned == HubModel(REPO, SNAPSHOT)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == builder_snapshot
    assert pin_revision(LocalModel(tmp_path), tmp_path) == LocalModel(tmp_path)
