"""pdserve's KV connector through vLLM: a prefill engine and a decode engine in two processes."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from bench.engine_process import start_peers, stop_peers
from engine.block_hash import hash_chain
from engine.config import EngineConfig, KVConnectorSpec
from engine.engine import Engine
from engine.types import GenerateRequest, SamplingOptions
from kv_transfer.channel import GrpcKVChannel
from kv_transfer.transfer import TransferHandle, TransferState

pytestmark = pytest.mark.engine

BLOCK = 32
SECRET = "connector-test-secret"
ENV = {"PDSERVE_CLUSTER_TOKEN": SECRET}


def config(model_dir, role: str, **extra) -> EngineConfig:
    connector = KVConnectorSpec(
        module_path="kv_transfer.vllm_connector", class_name="PdserveConnector", role=role, extra=extra
    )
    return EngineConfig(
        model=model_dir, dtype="float32", block_size=BLOCK, num_kv_blocks=64, max_model_len=512,
        kv_connector=connector, enforce_eager=True,
    )  # fmt: skip


DOOMED = ("killed_mid_pull", "dead_before_pull", "hangs_then_dies")  # engines a test each kills


@pytest.fixture(scope="module")
def engines(make_tiny_model):
    """The module's engines, loaded side by side (an engine loaded beside others costs a fraction of one loaded
    alone): the prefill and decode pair; a prefill engine whose offers' leases last 0.5 s, one whose last 4 s;
    and three prefill engines that a test each kills."""
    model = make_tiny_model("llama")
    peers = start_peers({"prefill": (config(model, "kv_producer", lease_s=30), ENV),
                         "decode": (config(model, "kv_consumer", stall_timeout_s=2), ENV),
                         "short_lease": (config(model, "kv_producer", lease_s=0.5), ENV),
                         "lease_4s": (config(model, "kv_producer", lease_s=4), ENV),
                         **{name: (config(model, "kv_producer", lease_s=30), ENV) for name in DOOMED}})  # fmt: skip
    yield peers
    stop_peers(peers.values())


@pytest.fixture(scope="module")
def prefill(engines):
    return engines["prefill"]


@pytest.fixture(scope="module")
def decode(engines):
    return engines["decode"]


def prompt(n: int, offset: int) -> list[int]:
    return [(offset * 7919 + i * 31) % 1000 + 2 for i in range(n)]


def produce(prefill, request_id: str, ids: list[int]) -> TransferHandle:
    params = {"pdserve": "produce", "transfer_id": f"x-{request_id}", "block_hashes": hashes(ids)}
    tokens, out_params, _, reason = prefill.generate(request_id, ids, 1, params)
    assert len(tokens) == 1 and reason == "length"
    return TransferHandle.from_bytes(bytes.fromhex(out_params["pdserve_handle"]))


def hashes(ids: list[int]) -> list[str]:
    return [h.hex() for h in hash_chain("tiny", ids, BLOCK)]


def consume(decode, request_id: str, ids: list[int], handle: TransferHandle | str, max_tokens: int = 16):
    encoded = handle if isinstance(handle, str) else handle.to_bytes().hex()
    params = {"pdserve": "consume", "handle": encoded, "block_hashes": hashes(ids)}
    return decode.generate(request_id, ids, max_tokens, params)


def idle(peer) -> int:
    """The KV pool of an engine with nothing running and no transfer held: every block free.

    Transfers released by earlier tests are freed at the engine's next steps, so wait for it
    (a block still held after 10 s is a leak, and fails here).
    """
    wait_until(lambda: peer.kv_blocks_used() == 0)
    return 0


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_disaggregated_greedy_output_equals_one_engine(prefill, decode):
    ids = prompt(5 * BLOCK + 7, offset=1)
    reference = prefill.generate("ref", ids, 16)[0]
    handle = produce(prefill, "p1", ids)
    assert handle.num_tokens == len(ids) and handle.num_blocks == 6
    tokens, _, cached, _ = consume(decode, "d1", ids, handle)
    assert tokens == reference
    assert cached >= 5 * BLOCK  # served from the transferred blocks, not recomputed


def test_a_handle_given_up_front_is_pulled_layer_by_layer_while_the_prompt_runs(prefill, decode):
    ids = prompt(5 * BLOCK + 3, offset=9)
    reference = prefill.generate("ref-early", ids, 16)[0]
    handle = prefill.kv_handle("x-early", hashes(ids), len(ids))
    assert TransferHandle.from_bytes(bytes.fromhex(handle)).num_blocks == 6
    result = {}
    puller = threading.Thread(target=lambda: result.setdefault("out", consume(decode, "d-early", ids, handle)))
    puller.start()  # the decode side asks first: the sender waits for the offer, then sends each layer once computed
    time.sleep(0.3)
    params = {"pdserve": "produce", "transfer_id": "x-early", "block_hashes": hashes(ids)}
    _, out_params, _, _ = prefill.generate("p-early", ids, 1, params)
    puller.join(60)
    tokens, _, cached, _ = result["out"]
    assert out_params["pdserve_handle"] == handle  # the same handle the router gave out up front
    assert tokens == reference and cached >= 5 * BLOCK
    wait_until(lambda: prefill.kv_blocks_used() == 0)


def test_a_decode_waiting_for_a_handle_given_up_front_counts_as_awaiting_its_kv_until_it_lands(
    make_tiny_model, prefill, monkeypatch
):
    """vLLM reports the request among its KV fetches in progress; the decode pool's autoscaling leaves it out."""
    monkeypatch.setenv("PDSERVE_CLUSTER_TOKEN", SECRET)
    ids = prompt(5 * BLOCK + 3, offset=21)
    handle = prefill.kv_handle("x-await", hashes(ids), len(ids))
    engine = Engine(config(make_tiny_model("llama"), "kv_consumer", stall_timeout_s=2))

    async def decode_then_prefill():
        params = {"pdserve": "consume", "handle": handle, "block_hashes": hashes(ids)}
        request = GenerateRequest("d-await", ids, SamplingOptions(max_tokens=4, temperature=0.0), params)
        decoding = asyncio.ensure_future(_deltas(engine, request))
        async with asyncio.timeout(30):
            while engine.stats().awaiting_kv == 0:
                await asyncio.sleep(0.05)
        awaiting = engine.stats()
        produce = {"pdserve": "produce", "transfer_id": "x-await", "block_hashes": hashes(ids)}
        await asyncio.to_thread(prefill.generate, "p-await", ids, 1, produce)
        return awaiting, await asyncio.wait_for(decoding, 60)

    try:
        awaiting, deltas = asyncio.run(decode_then_prefill())
        assert (awaiting.awaiting_kv, awaiting.waiting, awaiting.running) == (1, 1, 0)
        assert awaiting.sequences_to_serve == 0
        assert deltas[0].cached_prompt_tokens >= 5 * BLOCK  # it waited for the pull, not computing the prompt
        wait_until(lambda: engine.stats().awaiting_kv == 0)
    finally:
        engine.shutdown()


async def _deltas(engine: Engine, request: GenerateRequest) -> list:
    return [delta async for delta in engine.generate(request)]


def test_a_prefill_process_killed_mid_pull_is_recomputed_by_the_decode_side(engines, prefill, decode):
    doomed = engines["killed_mid_pull"]
    ids = prompt(12 * BLOCK + 5, offset=13)
    reference = prefill.generate("ref-killed", ids, 16)[0]
    handle = doomed.kv_handle("x-killed", hashes(ids), len(ids))
    result = {}
    puller = threading.Thread(target=lambda: result.setdefault("out", consume(decode, "d-killed", ids, handle)))
    puller.start()
    time.sleep(0.3)  # the decode side is pulling: connected, waiting for the offer's layers
    doomed.submit("p-killed", ids, 1, {"pdserve": "produce", "transfer_id": "x-killed", "block_hashes": hashes(ids)})
    time.sleep(0.05)
    doomed.kill()
    killed_at = time.monotonic()
    puller.join(30)
    assert not puller.is_alive(), "the decode side hung on a dead sender"
    tokens, _, cached, reason = result["out"]
    assert time.monotonic() - killed_at < 10  # the stall deadline (2 s) plus the local recompute
    assert tokens == reference and reason == "length"
    wait_until(lambda: decode.kv_blocks_used() == 0)
    assert consume(decode, "d-after-kill", prompt(3 * BLOCK, offset=14), produce(prefill, "p-after-kill",
                   prompt(3 * BLOCK, offset=14)))[3] == "length"  # fmt: skip


def test_the_prefill_blocks_are_freed_after_the_decode_side_releases_them(prefill, decode):
    baseline = idle(prefill)
    ids = prompt(4 * BLOCK, offset=2)
    handle = produce(prefill, "p2", ids)
    assert prefill.kv_blocks_used() > baseline  # held for the transfer
    consume(decode, "d2", ids, handle)
    wait_until(lambda: prefill.kv_blocks_used() == baseline)
    assert GrpcKVChannel(SECRET).status(handle).state == TransferState.DONE


def test_only_the_blocks_the_decode_side_lacks_cross(prefill, decode):
    from kv_transfer.handoff import PULLED_TOKENS_KEY

    shared = prompt(3 * BLOCK, offset=3)
    decode.generate("warm", shared + prompt(5, offset=4), 1)  # the decode side caches 3 blocks of the prefix
    ids = shared + prompt(3 * BLOCK + 4, offset=5)
    reference = prefill.generate("ref3", ids, 16)[0]
    handle = produce(prefill, "p3", ids)
    tokens, params, cached, _ = consume(decode, "d3", ids, handle)
    assert tokens == reference
    # vLLM counts the pulled tokens as cached; the connector says how many were pulled, so usage can tell them apart
    assert params[PULLED_TOKENS_KEY] == len(ids) - 3 * BLOCK and cached - params[PULLED_TOKENS_KEY] == 3 * BLOCK
    status = GrpcKVChannel(SECRET).status(handle)
    one_block = 2 * 2 * BLOCK * 2 * 32 * 4  # layers x kv heads x tokens x (K|V of head_dim 32) x float32
    assert status.bytes_sent == 4 * one_block  # 7 blocks offered, 3 already local


def test_an_abort_frees_the_prefill_blocks(prefill):
    baseline = idle(prefill)
    handle = produce(prefill, "p4", prompt(2 * BLOCK, offset=6))
    assert GrpcKVChannel(SECRET).abort(handle).state == TransferState.ABORTED
    wait_until(lambda: prefill.kv_blocks_used() == baseline)


@pytest.fixture(scope="module")
def short_lease(engines):
    """A prefill engine whose offers' leases last 0.5 s."""
    return engines["short_lease"]


def test_an_expired_lease_frees_the_prefill_blocks(short_lease):
    baseline = idle(short_lease)
    handle = produce(short_lease, "p5", prompt(2 * BLOCK, offset=7))
    wait_until(lambda: short_lease.kv_blocks_used() == baseline, 10)
    assert GrpcKVChannel(SECRET).status(handle).state == TransferState.EXPIRED


def test_a_dead_prefill_worker_means_local_recompute_with_the_same_output(engines, decode):
    doomed = engines["dead_before_pull"]
    ids = prompt(4 * BLOCK + 3, offset=8)
    reference = doomed.generate("ref6", ids, 16)[0]
    handle = produce(doomed, "p6", ids)
    doomed.kill()
    started = time.monotonic()
    tokens, _, _, reason = consume(decode, "d6", ids, handle)
    assert tokens == reference and reason == "length"
    assert time.monotonic() - started < 10


def pull_figures(peer, backend: str) -> dict:
    """An engine's pull figures for one backend, summed over its ranks; zeros before its first pull."""
    figures = peer.transfer_stats().get("pulls", {}).get(backend, {})
    return {"pulls": 0, "failures": 0, "bytes": 0, "seconds": 0.0, "seconds_by_phase": {}, **figures}


def test_the_receiver_takes_the_first_backend_of_its_preference_the_sender_offers(prefill, decode):
    """The decode side prefers torch.distributed (the default); a sender offering only gRPC gets a gRPC pull,
    with the same output."""
    for backends, used in [(None, "torch_dist"), (("grpc",), "grpc")]:
        ids = prompt(3 * BLOCK + 11, offset=9 if backends else 10)
        reference = prefill.generate(f"ref7-{used}", ids, 16)[0]
        handle = produce(prefill, f"p7-{used}", ids)
        offered = dataclasses.replace(handle, backends=backends) if backends else handle
        before = pull_figures(decode, used)["pulls"]
        tokens, _, cached, _ = consume(decode, f"d7-{used}", ids, offered)
        assert tokens == reference and cached >= 3 * BLOCK
        assert pull_figures(decode, used)["pulls"] == before + 1


def test_the_decode_sides_figures_say_where_its_torch_dist_pull_spent_its_time(prefill, decode):
    from kv_transfer.dist_channel import PHASES

    ids = prompt(3 * BLOCK + 2, offset=18)
    reference = prefill.generate("ref-phases", ids, 16)[0]
    before = pull_figures(decode, "torch_dist")
    tokens, _, cached, _ = consume(decode, "d-phases", ids, produce(prefill, "p-phases", ids))
    after = pull_figures(decode, "torch_dist")
    assert tokens == reference and cached >= 3 * BLOCK  # pulled, not recomputed
    assert (after["pulls"], after["failures"]) == (before["pulls"] + 1, before["failures"])
    assert set(after["seconds_by_phase"]) == set(PHASES)
    phases = sum(after["seconds_by_phase"].values()) - sum(before["seconds_by_phase"].values())
    assert 0 < phases <= after["seconds"] - before["seconds"]


def test_a_prefill_worker_that_hangs_then_dies_mid_pull_means_local_recompute(engines, decode):
    doomed = engines["hangs_then_dies"]
    ids = prompt(4 * BLOCK + 9, offset=14)
    reference = doomed.generate("ref11", ids, 16)[0]
    handle = produce(doomed, "p11", ids)
    doomed.freeze()  # the pull connects and then gets nothing
    killer = threading.Timer(1.0, doomed.kill)  # and dies while the decode side waits on it
    killer.start()
    started = time.monotonic()
    try:
        tokens, _, _, reason = consume(decode, "d11", ids, handle)
    finally:
        killer.join()
    assert tokens == reference and reason == "length"
    assert time.monotonic() - started < 2 + 5 + 3  # stall deadline (2 s), the release attempt, one step


def test_a_stalled_sender_means_local_recompute_and_both_sides_free_their_blocks(engines, decode):
    stalled = engines["lease_4s"]
    try:
        ids = prompt(4 * BLOCK + 3, offset=15)
        reference = stalled.generate("ref12", ids, 16)[0]
        handle = produce(stalled, "p12", ids)
        stalled.freeze()  # alive, sockets open, no progress
        started = time.monotonic()
        tokens, _, _, reason = consume(decode, "d12", ids, handle)
        assert tokens == reference and reason == "length"
        assert time.monotonic() - started < 2 + 5 + 3  # stall deadline (2 s), the release attempt, one step
        idle(decode)
        stalled.thaw()  # nobody pulls any more: its lease (4 s) frees the blocks
        wait_until(lambda: stalled.kv_blocks_used() == 0, 4 + 5)
    finally:
        stalled.thaw()


def test_a_chunk_corrupted_on_the_wire_means_local_recompute_and_nothing_corrupt_is_kept(prefill, decode):
    from faults import WireProxy

    ids = prompt(6 * BLOCK + 1, offset=16)
    reference = prefill.generate("ref13", ids, 16)[0]
    handle = produce(prefill, "p13", ids)
    proxy = WireProxy(handle.address(), corrupt_at=64 * 1024)
    failed_loads = decode.transfer_stats().get("failures", {}).get("integrity", 0)
    try:
        through_proxy = dataclasses.replace(handle.with_address(proxy.address), backends=("grpc",))
        tokens, _, _, reason = consume(decode, "d13", ids, through_proxy)
        assert proxy.corrupted >= 1
        assert decode.transfer_stats()["failures"]["integrity"] == failed_loads + 1  # the load failed
        assert tokens == reference and reason == "length"  # and the prompt was recomputed
    finally:
        proxy.close()
    idle(decode)
    idle(prefill)  # the failed pull aborted the transfer: the sender freed its blocks at once


def test_a_pull_slowed_past_the_lease_keeps_its_blocks_until_it_ends_and_completes(short_lease, decode):
    from faults import WireProxy

    sender = short_lease
    ids = prompt(6 * BLOCK + 1, offset=17)  # 7 blocks: 229 KB of KV
    handle = TransferHandle.from_bytes(bytes.fromhex(sender.kv_handle("x-slow", hashes(ids), len(ids))))
    proxy = WireProxy(handle.address(), bytes_per_s=150_000)  # ~1.5 s: three leases
    try:
        slow = dataclasses.replace(handle.with_address(proxy.address), backends=("grpc",))
        result = {}
        puller = threading.Thread(target=lambda: result.setdefault("out", consume(decode, "d-slow", ids, slow)))
        puller.start()  # the decode side waits for the offer: the pull opens as soon as it is made
        time.sleep(0.3)
        started = time.monotonic()
        sender.generate("p-slow", ids, 1, {"pdserve": "produce", "transfer_id": "x-slow", "block_hashes": hashes(ids)})
        puller.join(30)
        tokens, _, cached, reason = result["out"]
        assert time.monotonic() - started > 1.0  # the pull outlived its lease twice over
        # pulled, not recomputed: blocks freed at the lease's end would have failed the pull
        assert tokens == sender.generate("ref-slow", ids, 16)[0] and cached >= 6 * BLOCK
        idle(sender)
    finally:
        proxy.close()


def test_an_unusable_handle_means_a_local_prefill_with_the_same_output(prefill, decode):
    ids = prompt(2 * BLOCK + 5, offset=10)
    reference = prefill.generate("ref8", ids, 16)[0]
    handle = produce(prefill, "p8", ids)
    other_model = dataclasses.replace(handle, fingerprint=dataclasses.replace(handle.fingerprint, model_id="another"))
    other_model = other_model.to_bytes().hex()
    newer_wire = dataclasses.replace(handle, wire_version=99).to_bytes().hex()
    for i, bad in enumerate(["not-hex", "00ff", "", other_model, newer_wire]):
        tokens, _, cached, reason = consume(decode, f"bad{i}", ids, bad)
        assert tokens == reference and reason == "length"
    GrpcKVChannel(SECRET).release(handle)


def test_a_handle_for_another_prompt_is_never_loaded(prefill, decode):
    ids = prompt(3 * BLOCK, offset=11)
    other = prompt(3 * BLOCK, offset=12)
    reference = prefill.generate("ref9", ids, 16)[0]
    handle = produce(prefill, "p9", other)
    tokens, _, cached, _ = consume(decode, "d9", ids, handle)
    assert tokens == reference and cached == 0
    GrpcKVChannel(SECRET).release(handle)


def test_a_produce_request_without_a_transfer_id_holds_nothing(prefill):
    baseline = idle(prefill)
    tokens, params, _, reason = prefill.generate("p10", prompt(2 * BLOCK, offset=13), 1, {"pdserve": "produce"})
    assert len(tokens) == 1 and reason == "length" and not (params or {}).get("pdserve_handle")
    assert prefill.kv_blocks_used() == baseline


def test_a_transfer_id_used_twice_offers_the_first_and_holds_nothing_for_the_second(prefill):
    baseline = idle(prefill)
    first, second = prompt(2 * BLOCK, offset=15), prompt(2 * BLOCK, offset=16)
    params = {"pdserve": "produce", "transfer_id": "twice"}
    _, out, _, _ = prefill.generate("p12", first, 1, {**params, "block_hashes": hashes(first)})
    holding_first = prefill.kv_blocks_used()
    prefill.generate("p13", second, 1, {**params, "block_hashes": hashes(second)})
    wait_until(lambda: prefill.kv_blocks_used() == holding_first)
    GrpcKVChannel(SECRET).release(TransferHandle.from_bytes(bytes.fromhex(out["pdserve_handle"])))
    wait_until(lambda: prefill.kv_blocks_used() == baseline)
