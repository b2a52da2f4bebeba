"""Workers writing into the router's in-memory index over its index-writer listener (a real gRPC server)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import grpc
import pytest

from engine.block_hash import hash_chain
from engine.cache_events import BlocksRemoved, BlocksStored
from pdserve_pb.v1 import index_writer_pb2 as pb
from pdserve_pb.v1 import index_writer_pb2_grpc as pb_grpc
from router.index import MemoryPrefixIndex, WorkerInfo, WorkerLoad
from router.index.remote_writer import PROOF_KEY, RemoteIndexWriter, proof, start_index_writer
from router.index.reporting import IndexReporter

MODEL, BLOCK, TTL, TOKEN = "tiny", 4, 5.0, "cluster-secret"
CHAIN = hash_chain(MODEL, list(range(8 * BLOCK)), BLOCK)


class Router:
    """An in-memory index behind the writer listener, on an event loop of its own, restartable."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.index, self.address, self._server = None, None, None

    def start(self) -> Router:
        self.index = MemoryPrefixIndex()
        self._server, self.address = self._run(start_index_writer(self.index, "127.0.0.1", TOKEN))
        return self

    def stop(self) -> None:
        self._run(self._server.stop(grace=None))

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)


@pytest.fixture
def router():
    running = Router().start()
    yield running
    running.close()


def worker(worker_id: str = "a", epoch: int = 1) -> WorkerInfo:
    return WorkerInfo(worker_id, "decode", epoch, BLOCK)


def writer(router: Router, token: str = TOKEN) -> RemoteIndexWriter:
    return RemoteIndexWriter(lambda: router.address, token, timeout_s=2.0)


def test_heartbeats_and_cache_events_sent_by_a_worker_reach_the_routers_index(router):
    remote = writer(router)
    assert remote.heartbeat(worker(), TTL) is False  # new to the index
    remote.apply_events("a", 1, [BlocksStored(CHAIN[:6], None), BlocksRemoved(CHAIN[4:6])])
    assert remote.heartbeat(worker(), TTL) is True
    live, counts = router.index.match(CHAIN)
    assert [w.worker_id for w in live] == ["a"] and counts == {"a": 4}
    remote.forget_worker("a")
    assert router.index.match(CHAIN) == ([], {})


def test_a_heartbeat_carries_every_load_figure_placement_weighs(router):
    load = WorkerLoad(queued_prefill_tokens=300, running_seqs=2, waiting_seqs=1, kv_used_fraction=0.5,
                      kv_pool_tokens=6144)  # fmt: skip
    writer(router).heartbeat(replace(worker(), load=load), TTL)
    assert [w.load for w in router.index.live_workers()] == [load]


def test_a_writer_without_the_cluster_token_is_refused_and_writes_nothing(router):
    with pytest.raises(grpc.RpcError) as refused:
        writer(router, token="guessed").heartbeat(worker(), TTL)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert router.index.match(CHAIN) == ([], {})


def test_a_proof_for_one_worker_writes_nothing_for_another(router):
    with grpc.insecure_channel(router.address) as channel:
        stub = pb_grpc.IndexWriterStub(channel)
        request = pb.ForgetWorkerRequest(worker_id="b")
        with pytest.raises(grpc.RpcError) as refused:
            stub.ForgetWorker(request, timeout=5, metadata=((PROOF_KEY, proof(TOKEN, "a")),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_cache_event_of_no_kind_is_refused_and_leaves_the_index_as_it_was(router):
    remote = writer(router)
    remote.heartbeat(worker(), TTL)
    remote.apply_events("a", 1, [BlocksStored(CHAIN[:4], None)])
    with grpc.insecure_channel(router.address) as channel:
        request = pb.ApplyEventsRequest(worker_id="a", epoch=1, events=[pb.IndexCacheEvent()])
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.IndexWriterStub(channel).ApplyEvents(request, timeout=5, metadata=((PROOF_KEY, proof(TOKEN, "a")),))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert router.index.match(CHAIN)[1] == {"a": 4}


def test_an_unreachable_router_is_an_outage_counted_once_not_an_error(router):
    remote = writer(router)
    assert remote.heartbeat(worker(), TTL) is False
    router.stop()
    assert remote.heartbeat(worker(), TTL) is None
    remote.apply_events("a", 1, [BlocksStored(CHAIN[:2], None)])  # within the retry pause: not tried
    health = remote.health()
    assert not health.available and health.outages == 1 and health.failed_calls == 2


def test_a_worker_resends_what_it_holds_to_a_router_restarted_elsewhere_with_an_empty_index(router):
    reporter = IndexReporter(worker(), TTL, writer(router))
    reporter.report_load(WorkerLoad())
    reporter.report_events([BlocksStored(CHAIN, None), BlocksRemoved(CHAIN[6:])])
    assert router.index.match(CHAIN)[1] == {"a": 6}
    router.stop()
    reporter.report_events([BlocksRemoved(CHAIN[4:6])])  # lost with the router
    router.start()  # a new port, an empty index: the writer looks the address up again
    deadline = time.monotonic() + 5
    while router.index.match(CHAIN)[1] != {"a": 4}:
        assert time.monotonic() < deadline, f"the index was not repaired: {router.index.match(CHAIN)}"
        reporter.report_load(WorkerLoad())
        time.sleep(0.1)
