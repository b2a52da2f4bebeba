"""A hosted engine's load as the prefix index sees it (the simulated engine, an in-process index)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from engine.block_hash import hash_chain
from engine.config import EngineConfig, KVConnectorSpec
from engine.hosting import HostedEngine
from engine.sim.engine import SimulatedEngine
from engine.types import GenerateRequest, SamplingOptions
from kv_transfer.handoff import TOKEN_ENV, SenderInfo, transfer_handle
from router.index import MemoryPrefixIndex, WorkerInfo
from router.index.reporting import IndexReporter

BEAT_S = 2.0


class InProcessIndex:
    """A worker reporting straight into an index in this process."""

    def __init__(self):
        self.index = MemoryPrefixIndex()

    def start(self, worker_id: str, role: str, block_size: int, cpu_cores: str = "") -> IndexReporter:
        return IndexReporter(WorkerInfo(worker_id, role, 1, block_size), 30.0, self.index)


def profile_file(tmp_path, prefill_ms_per_token: float = 0.0) -> str:
    """A simulated hardware profile: steps of a millisecond plus the prompt's tokens at the given cost."""
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"name": "hosting-test", "source": "tests", "base_ms": 1.0,
                                "prefill_ms_per_token": prefill_ms_per_token, "prefill_ms_per_token2": 0.0,
                                "decode_ms_per_seq": 0.0, "decode_ms_per_context_token": 0.0,
                                "kv_bytes_per_token": 1, "link_bytes_per_s": 1e9}))  # fmt: skip
    return str(path)


def queued(index: MemoryPrefixIndex) -> int:
    (worker,) = index.live_workers()
    return worker.load.queued_prefill_tokens


def test_a_worker_beats_as_soon_as_a_prompt_is_done_not_a_beat_later(make_tiny_model, tmp_path):
    """Routers read the queue from the last beat: a finished prompt must not look queued until the next one."""
    profile = profile_file(tmp_path, 2500 / 300)  # a 300-token prompt takes 2.5 s: a regular beat sees it queued
    config = EngineConfig(kind="simulated", model=make_tiny_model("llama"), num_kv_blocks=64,
                          simulated_profile=profile)  # fmt: skip
    reporting = InProcessIndex()
    host = HostedEngine(config, "prefill", "w1", reporting, heartbeat_s=BEAT_S)
    seen = []  # the queue the index holds, sampled while the prompt runs

    async def prefill_and_watch() -> None:
        request = GenerateRequest(uuid.uuid4().hex, list(range(2, 302)), SamplingOptions(max_tokens=1))
        stream = asyncio.ensure_future(_drain(host.stream(request)))
        while not stream.done():
            seen.append(queued(reporting.index))
            await asyncio.sleep(0.05)
        await stream

    try:
        asyncio.run(prefill_and_watch())
        done_at = time.monotonic()
        assert 300 in seen, "no regular beat saw the prompt queued"
        while queued(reporting.index) != 0:  # the next regular beat is ~1.5 s away
            assert time.monotonic() - done_at < 0.5, "the finished prompt still looked queued"
            time.sleep(0.01)
    finally:
        host.close()


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def test_a_workers_heartbeat_reports_its_kv_pools_size_in_tokens(make_tiny_model, tmp_path):
    """Placement reads the KV placed on a decode worker since its last beat as a share of this pool."""
    config = EngineConfig(kind="simulated", model=make_tiny_model("llama"), num_kv_blocks=64, block_size=16,
                          simulated_profile=profile_file(tmp_path))  # fmt: skip
    reporting = InProcessIndex()
    host = HostedEngine(config, "decode", "d1", reporting, heartbeat_s=0.1)
    try:
        deadline = time.monotonic() + 5
        while not reporting.index.live_workers():
            assert time.monotonic() < deadline, "the worker never beat"
            time.sleep(0.01)
        (worker,) = reporting.index.live_workers()
        assert worker.load.kv_pool_tokens == 64 * 16
    finally:
        host.close()


def test_a_decode_waiting_for_a_prefill_workers_kv_is_not_in_its_own_prefill_queue(
    make_tiny_model, tmp_path, monkeypatch
):
    """The router sends a prompt to the decode worker when it would get to it before the prefill pool; a
    decode that only waits for a prefill worker's KV computes none of its prompt there, so it is left out."""
    monkeypatch.setenv(TOKEN_ENV, "hosting-secret")
    profile = profile_file(tmp_path)

    def config(role: str) -> EngineConfig:
        kv = KVConnectorSpec(module_path="kv_transfer.sim_connector", class_name="SimulatedKV", role=role)
        return EngineConfig(kind="simulated", model=make_tiny_model("llama"), num_kv_blocks=64, block_size=16,
                            simulated_profile=profile, kv_connector=kv)  # fmt: skip

    producer = SimulatedEngine(config("kv_producer"), on_cache_events=None)  # never prefills: the KV never comes
    reporting = InProcessIndex()
    host = HostedEngine(config("kv_consumer"), "decode", "d1", reporting, heartbeat_s=0.1)
    ids = list(range(2, 302))
    hashes = [digest.hex() for digest in hash_chain(producer.model_id, ids, 16)]
    senders = [SenderInfo.from_dict(rank) for rank in producer.kv_connector_handshake()]
    handle = transfer_handle(senders, 16, "t-never", hashes, len(ids))

    async def await_kv_and_watch() -> tuple[int, int]:
        consume = {"pdserve": "consume", "handle": handle, "block_hashes": hashes}
        request = GenerateRequest(uuid.uuid4().hex, ids, SamplingOptions(max_tokens=1), consume)
        stream = asyncio.ensure_future(_drain(host.stream(request)))
        async with asyncio.timeout(10):
            while host.engine.stats().awaiting_kv == 0:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # beats after it was admitted
        stream.cancel()
        return host.engine.stats().awaiting_kv, queued(reporting.index)

    try:
        awaiting, queued_tokens = asyncio.run(await_kv_and_watch())
        assert (awaiting, queued_tokens) == (1, 0)
    finally:
        host.close()
        producer.shutdown()
