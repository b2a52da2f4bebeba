"""The in-memory index's write path over gRPC: the router replica serves it, each worker writes through it.

With Redis, workers write to the index themselves. With the in-memory index one
router replica holds it, and workers used to report through a Serve handle. A
Serve call is a streaming task, and Ray (2.60) keeps the callee's event loop
until the caller has acknowledged every item of a finished one: a worker node cut
off mid-report held the router's Serve loop for the ~30-60 s Ray takes to declare
the node dead, so no heartbeat from the healthy workers arrived, they lapsed, and
streams that could have moved to them failed instead. Here a cut-off worker only
ever costs its own call.

``RemoteIndexWriter`` is the writing half of ``PrefixIndex`` (``heartbeat``,
``apply_events``, ``forget_worker``, ``health``), so ``IndexReporter`` treats it
as it treats Redis: a heartbeat the index does not recognise, or one after an
outage, makes the worker re-send all it holds. The router's address is looked up
(a Serve call, once, and again after a failure: the router may have restarted
elsewhere). Each call carries ``HMAC-SHA256(cluster token, worker id)``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields

import grpc

from engine.cache_events import AllCleared, BlocksRemoved, BlocksStored, CacheEvent
from pdserve_pb.v1 import index_writer_pb2 as pb
from pdserve_pb.v1 import index_writer_pb2_grpc as pb_grpc
from router.index.base import IndexHealth, PrefixIndex, WorkerInfo, WorkerLoad

log = logging.getLogger(__name__)

PROOF_KEY = "x-pdserve-index-proof"
_RETRY_S = 1.0  # after a failed call, the next calls within this fail at once (a heartbeat's period)


def proof(token: str, worker_id: str) -> str:
    return hmac.new(token.encode(), worker_id.encode(), hashlib.sha256).hexdigest()


class IndexWriterServicer(pb_grpc.IndexWriterServicer):
    """Writes into ``index`` what a worker that proves the cluster token sends."""

    def __init__(self, index: PrefixIndex, token: str):
        self._index = index
        self._token = token

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        await self._check(request.worker.worker_id, context)
        known = self._index.heartbeat(_worker_info(request.worker), request.ttl_s)
        return pb.HeartbeatReply(known=bool(known))

    async def ApplyEvents(self, request: pb.ApplyEventsRequest, context) -> pb.IndexWriteReply:
        await self._check(request.worker_id, context)
        try:
            events = [_event(e) for e in request.events]
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._index.apply_events(request.worker_id, request.epoch, events)
        return pb.IndexWriteReply()

    async def ForgetWorker(self, request: pb.ForgetWorkerRequest, context) -> pb.IndexWriteReply:
        await self._check(request.worker_id, context)
        self._index.forget_worker(request.worker_id)
        return pb.IndexWriteReply()

    async def _check(self, worker_id: str, context) -> None:
        presented = dict(context.invocation_metadata()).get(PROOF_KEY)
        if presented is None or not hmac.compare_digest(proof(self._token, worker_id), presented):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid proof of the cluster token")


async def start_index_writer(index: PrefixIndex, host: str, token: str) -> tuple[grpc.aio.Server, str]:
    """The writer's listener on ``host`` (an address the worker nodes reach), on a port the OS picks."""
    server = grpc.aio.server()
    pb_grpc.add_IndexWriterServicer_to_server(IndexWriterServicer(index, token), server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, f"{host}:{port}"


class RemoteIndexWriter:
    """A worker's handle on the router's index: each call bounded by ``timeout_s``, a failed one counted
    (an outage begins at the first failure after a success) and answered as Redis's backend answers."""

    network_io = True

    def __init__(self, locate: Callable[[], str], token: str, timeout_s: float):
        self._locate = locate
        self._token = token
        self._timeout_s = timeout_s
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.IndexWriterStub | None = None
        self._available = False
        self._retry_at = 0.0
        self._outages = 0
        self._failed_calls = 0

    def heartbeat(self, worker: WorkerInfo, ttl_s: float) -> bool | None:
        request = pb.HeartbeatRequest(worker=_worker_message(worker), ttl_s=ttl_s)
        reply = self._call("Heartbeat", request, worker.worker_id)
        return None if reply is None else reply.known

    def apply_events(self, worker_id: str, epoch: int, events: Sequence[CacheEvent]) -> None:
        request = pb.ApplyEventsRequest(worker_id=worker_id, epoch=epoch, events=[_event_message(e) for e in events])
        self._call("ApplyEvents", request, worker_id)

    def forget_worker(self, worker_id: str) -> None:
        self._call("ForgetWorker", pb.ForgetWorkerRequest(worker_id=worker_id), worker_id)

    def health(self) -> IndexHealth:
        return IndexHealth(available=self._available, outages=self._outages, failed_calls=self._failed_calls)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def _call(self, method: str, request, worker_id: str):
        if not self._available and time.monotonic() < self._retry_at:
            self._failed_calls += 1  # not again at once: each try may wait on the address lookup
            return None
        try:
            if self._stub is None:
                self._channel = grpc.insecure_channel(self._locate())
                self._stub = pb_grpc.IndexWriterStub(self._channel)
            reply = getattr(self._stub, method)(
                request, timeout=self._timeout_s, metadata=((PROOF_KEY, proof(self._token, worker_id)),)
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise  # a wrong token is a configuration error, not an outage: say so loudly
            return self._failed(exc)
        except Exception as exc:  # the router's address could not be looked up (not up yet, restarting)
            return self._failed(exc)
        if not self._available:
            self._available = True
            log.info("the router's prefix index is reachable (after %d failed calls)", self._failed_calls)
        return reply

    def _failed(self, exc: Exception) -> None:
        self._failed_calls += 1
        self._retry_at = time.monotonic() + _RETRY_S
        self.close()  # look the router up again: it may have restarted elsewhere
        if self._available:
            self._available = False
            self._outages += 1
            log.warning("the router's prefix index is unreachable: %s", exc)
        return None


def _worker_message(worker: WorkerInfo) -> pb.IndexWorker:
    return pb.IndexWorker(
        worker_id=worker.worker_id, role=worker.role, epoch=worker.epoch, block_size=worker.block_size,
        cpu_cores=worker.cpu_cores, load=pb.IndexWorkerLoad(**asdict(worker.load)),  # field for field, by name
    )  # fmt: skip


def _worker_info(message: pb.IndexWorker) -> WorkerInfo:
    load = WorkerLoad(**{figure.name: getattr(message.load, figure.name) for figure in fields(WorkerLoad)})
    return WorkerInfo(
        message.worker_id, message.role, message.epoch, message.block_size, load, cpu_cores=message.cpu_cores
    )


def _event_message(event: CacheEvent) -> pb.IndexCacheEvent:
    if isinstance(event, BlocksStored):
        return pb.IndexCacheEvent(stored=pb.BlocksStoredEvent(hashes=event.hashes, parent=event.parent))
    if isinstance(event, BlocksRemoved):
        return pb.IndexCacheEvent(removed=pb.BlocksRemovedEvent(hashes=event.hashes))
    return pb.IndexCacheEvent(cleared=pb.AllClearedEvent())


def _event(message: pb.IndexCacheEvent) -> CacheEvent:
    which = message.WhichOneof("event")
    if which == "stored":
        stored = message.stored
        return BlocksStored(list(stored.hashes), stored.parent if stored.HasField("parent") else None)
    if which == "removed":
        return BlocksRemoved(list(message.removed.hashes))
    if which == "cleared":
        return AllCleared()
    raise ValueError("a cache event with no kind (stored, removed or cleared)")
