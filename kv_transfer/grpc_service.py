"""The sender's gRPC service: Pull streams chunks of an offer; Release, Abort, Renew and Status control it.

Every call must carry the cluster proof for its transfer id before anything
is read. A pull streams batch by batch, each batch the blocks the prefill has
computed or is computing (one batch for a prompt computed in one step, one per
chunk for a longer one), and each batch layer by layer, waiting (under the
stall deadline) for layers and chunks the prefill has not finished yet. Chunk
headers say which batch (``first_block``, ``num_blocks``: positions in the
request's block list) and layer they carry. A pull takes the KV heads it asks
for: a receiver rank of another tensor-parallel size takes a slice of this
rank's heads. A handle can reach the receiver before the sender has
registered its offer (the engine offers at its next step), so every call
first waits, under the same deadline, for the offer.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
import xxhash

from kv_transfer import auth
from kv_transfer.cache_arrays import host_bytes
from kv_transfer.chunk_codec import encode_chunk
from kv_transfer.errors import TransferDenied, TransferError
from kv_transfer.transfer import (
    DEFAULT_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    TransferRegistry,
    TransferStatus,
    check_wire_version,
)
from pdserve_pb.v1 import kv_transfer_pb2 as pb
from pdserve_pb.v1 import kv_transfer_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # torch.distributed's sender, built only where that backend is offered (it needs torch)
    from kv_transfer.dist_channel import DistSender

log = logging.getLogger(__name__)


class KVTransferService(pb_grpc.KVTransferServicer):
    def __init__(
        self, registry: TransferRegistry, secret: str, dist_sender: DistSender | None, stall_timeout_s: float = 5.0
    ):
        self._registry = registry
        self._secret = secret
        self._dist = dist_sender
        self._stall_timeout_s = stall_timeout_s

    def PullDist(self, request: pb.DistPullRequest, context: grpc.ServicerContext) -> pb.DistPlan:
        if self._dist is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this sender does not offer torch_dist (see its handle)")
        try:
            self._admit(request.pull.transfer_id, request.pull.wire_version, context)
            # waits for the offer, then for its next batch, within the caller's deadline
            remaining = context.time_remaining()
            wait_s = self._stall_timeout_s if remaining is None else min(self._stall_timeout_s, remaining - 0.1)
            deadline = time.monotonic() + max(0.0, wait_s)
            self._registry.await_offer(request.pull.transfer_id, max(0.0, deadline - time.monotonic()))
            return self._dist.plan(request, max(0.0, deadline - time.monotonic()), context.is_active)
        except TransferError as exc:
            context.abort(exc.code, str(exc))

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext):
        try:
            self._admit(request.transfer_id, request.wire_version, context)
            self._registry.await_offer(request.transfer_id, self._stall_timeout_s)
            offer = self._registry.open_pull(request.transfer_id, request.block_indices, request.layers)
        except TransferError as exc:
            context.abort(exc.code, str(exc))
        try:
            heads = self._registry.check_heads(offer, request.first_head, request.num_heads)
        except TransferError as exc:
            self._registry.close_pull(offer, 0)
            context.abort(exc.code, str(exc))
        gone = threading.Event()  # the receiver cancelled or died: stop waiting for layers at once
        context.add_callback(lambda: (gone.set(), self._registry.wake(offer)))
        sent = 0
        chunk_bytes = request.max_chunk_bytes or DEFAULT_CHUNK_BYTES
        indices = list(request.block_indices) or list(range(offer.handle.num_blocks))
        position = 0  # of the next batch in ``indices``
        try:
            while position < len(indices):
                batch = self._registry.next_batch(offer, indices[position:], self._stall_timeout_s, gone)
                for layer in request.layers or range(len(offer.layers)):
                    if not batch or not self._registry.wait_layer_ready(
                        offer, layer, self._stall_timeout_s, gone, last_block=batch[-1]
                    ):
                        return
                    offset = 0
                    for run in self._registry.read_blocks(offer, layer, batch, heads):
                        # one copy where heads are sliced out of a block, or a CUDA cache's blocks come to the host
                        payload = memoryview(host_bytes(run))
                        for start in range(0, len(payload), chunk_bytes):
                            if not context.is_active():
                                return
                            piece = payload[start : start + chunk_bytes]
                            header = pb.ChunkHeader(
                                transfer_id=request.transfer_id, layer=layer, part=pb.KV_PART_KV,
                                first_block=position, num_blocks=len(batch), byte_offset=offset,
                                byte_length=len(piece), xxh3_64=xxhash.xxh3_64_intdigest(piece),
                            )  # fmt: skip
                            chunk = encode_chunk(header, piece)  # the copy out of the cache
                            self._registry.check_unfinished(offer)  # not aborted (its blocks reused) mid-copy
                            yield chunk
                            offset += len(piece)
                            sent += len(piece)
                position += len(batch)
        except TransferError as exc:
            context.abort(exc.code, str(exc))
        finally:
            self._registry.close_pull(offer, sent)

    def Release(self, request: pb.TransferRef, context: grpc.ServicerContext) -> pb.TransferStatus:
        return self._control(request, context, lambda tid: self._registry.release(tid, request.receivers or 1))

    def Renew(self, request: pb.TransferRef, context: grpc.ServicerContext) -> pb.TransferStatus:
        # not offered yet: NOT_FOUND at once (the puller renews again), no server thread held waiting for it
        return self._control(request, context, self._registry.renew, await_offer=False)

    def Abort(self, request: pb.TransferRef, context: grpc.ServicerContext) -> pb.TransferStatus:
        return self._control(request, context, self._registry.abort)

    def Status(self, request: pb.TransferRef, context: grpc.ServicerContext) -> pb.TransferStatus:
        return self._control(request, context, self._registry.status)

    def _control(self, request: pb.TransferRef, context, action, await_offer: bool = True) -> pb.TransferStatus:
        try:
            self._admit(request.transfer_id, request.wire_version, context)
            if await_offer:
                self._registry.await_offer(request.transfer_id, self._stall_timeout_s)
            return status_to_proto(action(request.transfer_id))
        except TransferError as exc:
            context.abort(exc.code, str(exc))

    def _admit(self, transfer_id: str, wire_version: int, context: grpc.ServicerContext) -> None:
        presented = dict(context.invocation_metadata()).get(auth.METADATA_KEY)
        if not auth.verify(self._secret, transfer_id, presented):
            raise TransferDenied(transfer_id, "missing or wrong cluster token")
        check_wire_version(transfer_id, wire_version)


def _handlers(service: KVTransferService) -> grpc.GenericRpcHandler:
    """The generated handlers, except that Pull's chunks arrive already encoded (``chunk_codec``)."""

    def unary(method, request_type, reply_type):
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=request_type.FromString, response_serializer=reply_type.SerializeToString
        )

    return grpc.method_handlers_generic_handler(
        "pdserve.v1.KVTransfer",
        {
            "Pull": grpc.unary_stream_rpc_method_handler(
                service.Pull, request_deserializer=pb.PullRequest.FromString, response_serializer=bytes
            ),
            "PullDist": unary(service.PullDist, pb.DistPullRequest, pb.DistPlan),
            "Release": unary(service.Release, pb.TransferRef, pb.TransferStatus),
            "Abort": unary(service.Abort, pb.TransferRef, pb.TransferStatus),
            "Status": unary(service.Status, pb.TransferRef, pb.TransferStatus),
            "Renew": unary(service.Renew, pb.TransferRef, pb.TransferStatus),
        },
    )


def status_to_proto(status: TransferStatus) -> pb.TransferStatus:
    return pb.TransferStatus(
        transfer_id=status.transfer_id, state=int(status.state), detail=status.detail,
        lease_remaining_s=status.lease_remaining_s, bytes_sent=status.bytes_sent, layers_ready=status.layers_ready,
    )  # fmt: skip


class KVTransferServer:
    """The sender's gRPC server on ``host:port`` (port 0: a free one); TLS when given a key and certificate."""

    def __init__(
        self,
        registry: TransferRegistry,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 0,
        stall_timeout_s: float = 5.0,
        tls: tuple[bytes, bytes] | None = None,
        max_workers: int = 64,  # a pull holds one for its whole stream: a chunked prompt's, its whole prefill
        torch_dist: bool = True,  # also serve torch.distributed pulls' plans (the handle must offer that backend)
    ):
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        self._dist = None
        if torch_dist:
            from kv_transfer.dist_channel import DistSender

            self._dist = DistSender(registry, host, stall_timeout_s)
        service = KVTransferService(registry, secret, self._dist, stall_timeout_s)
        self._server.add_generic_rpc_handlers((_handlers(service),))
        target = f"{host}:{port}"
        if tls is None:
            self.port = self._server.add_insecure_port(target)
        else:
            key, certificate = tls
            self.port = self._server.add_secure_port(target, grpc.ssl_server_credentials([(key, certificate)]))
        self.address = f"{host}:{self.port}"
        registry.address = self.address  # handles name the address the server really bound

    def start(self) -> KVTransferServer:
        self._server.start()
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s).wait(grace_s + 1)
        if self._dist is not None:
            self._dist.close()
