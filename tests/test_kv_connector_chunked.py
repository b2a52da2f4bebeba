"""A prompt longer than the prefill engine's token budget per step: its KV offered and pulled chunk by chunk.

A prefill engine and a decode engine in two processes, a 4,000-token prompt, ``max_num_batched_tokens``
1,024: the prompt runs in four chunks, and the decode side pulls each chunk's blocks while later chunks run.
The engine-benchmark model's shape (8 layers), so that a chunk takes long enough on two shared cores to
tell chunk-by-chunk streaming from layer-by-layer streaming of the last chunk alone.
"""

from __future__ import annotations

import threading
import time

import pytest
from helpers import wait_for

from bench.engine_process import start_peers, stop_peers
from engine.block_hash import hash_chain
from engine.config import EngineConfig, KVConnectorSpec
from engine.tiny_model import BENCH_SHAPE, make_model
from kv_transfer.channel import GrpcKVChannel
from kv_transfer.errors import TransferNotFound
from kv_transfer.transfer import TransferHandle, TransferState

pytestmark = pytest.mark.engine

BLOCK, CHUNK, PROMPT = 32, 1024, 4000
SECRET = "chunked-connector-secret"
ENV = {"PDSERVE_CLUSTER_TOKEN": SECRET}


def config(model_dir, role: str) -> EngineConfig:
    connector = KVConnectorSpec(module_path="kv_transfer.vllm_connector", class_name="PdserveConnector", role=role)
    return EngineConfig(
        model=model_dir, dtype="float32", block_size=BLOCK, num_kv_blocks=160, max_model_len=4096,
        max_num_batched_tokens=CHUNK, kv_connector=connector, enforce_eager=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("bench-model"), BENCH_SHAPE)


@pytest.fixture(scope="module")
def engines(model):
    """The module's prefill and decode engines, loaded side by side."""
    peers = start_peers({"prefill": (config(model, "kv_producer"), ENV), "decode": (config(model, "kv_consumer"), ENV)})
    yield peers
    stop_peers(peers.values())


@pytest.fixture(scope="module")
def prefill(engines):
    return engines["prefill"]


@pytest.fixture(scope="module")
def decode(engines):
    return engines["decode"]


def prompt(offset: int) -> list[int]:
    return [(offset * 7919 + i * 31) % 1000 + 2 for i in range(PROMPT)]


def hashes(ids: list[int]) -> list[str]:
    return [h.hex() for h in hash_chain("bench", ids, BLOCK)]


def produce_params(transfer_id: str, ids: list[int]) -> dict:
    return {"pdserve": "produce", "transfer_id": transfer_id, "block_hashes": hashes(ids)}


def consume_params(handle: str, ids: list[int]) -> dict:
    return {"pdserve": "consume", "handle": handle, "block_hashes": hashes(ids)}


def test_the_decode_side_pulls_a_long_prompt_while_its_prefill_still_runs(prefill, decode):
    ids = prompt(1)
    handle = prefill.kv_handle("x-long", hashes(ids), len(ids))
    result = {}
    puller = threading.Thread(target=lambda: result.setdefault("out", decode.generate(
        "d-long", ids, 16, consume_params(handle, ids))))  # fmt: skip
    puller.start()  # the decode side has the handle before the prompt runs, as the router gives it
    time.sleep(0.3)
    _, out_params, _, _ = prefill.generate("p-long", ids, 1, produce_params("x-long", ids))
    puller.join(60)
    tokens, _, cached, _ = result["out"]
    reference = prefill.generate("ref", ids, 16)[0]  # after: run first, it would leave the prompt in the cache
    assert out_params["pdserve_handle"] == handle
    assert tokens == reference and cached >= PROMPT - BLOCK  # served from the pulled blocks
    (computed,), (pulled,) = prefill.transfer_times("x-long"), decode.transfer_times("x-long")
    # timestamps from both sides: the first chunk's bytes landed before the prefill's last chunk even began
    assert pulled["first_bytes_at"] < computed["last_step_at"] < computed["computed_at"] <= pulled["landed_at"]
    wait_for(lambda: prefill.kv_blocks_used() == 0, 10)


def test_a_long_prompt_whose_handle_comes_after_the_prefill_is_pulled_whole(prefill, decode):
    ids = prompt(2)
    _, out_params, _, _ = prefill.generate("p-after", ids, 1, produce_params("x-after", ids))
    before = decode.transfer_stats().get("pulls", {})
    tokens, _, cached, _ = decode.generate("d-after", ids, 16, consume_params(out_params["pdserve_handle"], ids))
    assert tokens == prefill.generate("ref2", ids, 16)[0] and cached >= PROMPT - BLOCK
    moved = {b: f["bytes"] - before.get(b, {}).get("bytes", 0) for b, f in decode.transfer_stats()["pulls"].items()}
    shape = BENCH_SHAPE
    one_block = shape.layers * shape.kv_heads * BLOCK * 2 * shape.head_dim * 4  # K|V of each head, float32
    assert sum(moved.values()) == -(-PROMPT // BLOCK) * one_block
    wait_for(lambda: prefill.kv_blocks_used() == 0, 10)


def test_an_offer_aborted_mid_prompt_frees_its_blocks_when_the_prefill_ends(prefill):
    ids = prompt(3)
    handle = TransferHandle.from_bytes(bytes.fromhex(prefill.kv_handle("x-gone", hashes(ids), len(ids))))
    prefill.submit("p-gone", ids, 1, produce_params("x-gone", ids))
    control = GrpcKVChannel(SECRET)

    def aborted() -> bool:  # as soon as the first chunk's offer exists: later chunks run after it
        try:
            return control.abort(handle, timeout_s=1).state == TransferState.ABORTED
        except TransferNotFound:
            return False

    wait_for(aborted, 10)
    tokens, _, _, reason = prefill.result()
    assert len(tokens) == 1 and reason == "length"  # the prefill finished: no chunk after the abort failed it
    wait_for(lambda: prefill.kv_blocks_used() == 0, 10)
    assert prefill.generate("after-gone", prompt(4)[:100], 4)[3] == "length"
