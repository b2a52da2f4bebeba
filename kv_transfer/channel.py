"""The receiver's side: one ``KVChannel`` interface, a gRPC streaming backend and an in-process one.

A pull writes the requested blocks of every requested layer, from one sender
rank, straight into destination tensors the receiver reserved
(``dest_layers[layer][dest_block_ids]``; with tensor-parallel sizes that differ,
a slice of the KV heads, ``HeadSlice``),
verifying each chunk's length and checksum before it lands. The sender sends
batch by batch (the blocks computed so far, then each later chunk of a long
prompt as it is computed), each batch layer by layer. Every pull has a stall
deadline (no chunk for that long: the peer stalled or died) and an overall
deadline; failures are typed ``TransferError``s, never a hang.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import xxhash

from kv_transfer import auth
from kv_transfer.cache_arrays import (
    CacheArray,
    concatenate,
    contiguous,
    copy_blocks,
    dtype_name,
    host_bytes,
    nbytes,
    on_host,
)
from kv_transfer.cache_arrays import staging as staging_for
from kv_transfer.chunk_codec import decode_chunk
from kv_transfer.errors import (
    BY_CODE,
    TransferError,
    TransferIntegrityError,
    TransferLayoutError,
    TransferRequestError,
    TransferTimeout,
    TransferUnavailable,
)
from kv_transfer.transfer import (
    DEFAULT_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    WIRE_VERSION,
    HeadSlice,
    TransferHandle,
    TransferRegistry,
    TransferState,
    TransferStatus,
    runs,
)
from pdserve_pb.v1 import kv_transfer_pb2 as pb
from pdserve_pb.v1 import kv_transfer_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class PullResult:
    transfer_id: str
    blocks: int
    layers: int
    bytes: int
    seconds: float
    first_bytes_at: float = 0.0  # wall clock (time.time()) when the first bytes landed; 0.0 when none did
    phases: dict[str, float] = field(default_factory=dict)  # seconds by step of the pull, where a channel times them


class KVChannel(Protocol):
    name: str

    def pull(
        self,
        handle: TransferHandle,
        dest_layers: Sequence[CacheArray],
        dest_block_ids: Sequence[int],
        block_indices: Sequence[int] = (),
        layers: Sequence[int] = (),
        stall_timeout_s: float = 5.0,
        timeout_s: float = 60.0,
        rank: int = 0,
        heads: HeadSlice | None = None,
    ) -> PullResult:
        """Copy blocks ``block_indices`` (all when empty) of ``layers`` from sender rank ``rank`` into
        ``dest_block_ids``: the heads ``heads`` names, or all that rank holds into all the receiver holds."""

    def release(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0, receivers: int = 1):
        """This receiver rank is done with ``rank``'s blocks (freed once all ``receivers`` ranks are)."""

    def abort(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0) -> TransferStatus: ...

    def renew(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0) -> TransferStatus: ...


def check_request(
    handle: TransferHandle, dest_layers, dest_block_ids, block_indices, layers, rank: int, heads: HeadSlice | None
) -> tuple[list[int], list[int], HeadSlice]:
    """The block indices, layers and heads a pull moves, checked against the handle and the destination."""
    indices = list(block_indices) or list(range(handle.num_blocks))
    wanted_layers = list(layers) or list(range(handle.num_layers))
    tid = handle.transfer_id
    if len(dest_block_ids) != len(indices):
        raise TransferRequestError(tid, f"{len(indices)} blocks requested but {len(dest_block_ids)} destination blocks")
    if len(dest_layers) != handle.num_layers:
        raise TransferRequestError(tid, f"{len(dest_layers)} destination layers for {handle.num_layers}")
    if not 0 <= rank < len(handle.ranks):
        raise TransferRequestError(tid, f"sender rank {rank} of {len(handle.ranks)}")
    first = dest_layers[0]
    ours = (dtype_name(first), tuple(first.shape[2:]))
    theirs = (handle.dtype, tuple(handle.fingerprint.head_shape))
    if ours != theirs:
        raise TransferLayoutError(tid, f"sender (dtype, head block) {theirs} != receiver {ours}")
    held, room = handle.ranks[rank].num_heads, first.shape[1]
    heads = heads or HeadSlice(0, 0, held)
    if heads.count <= 0 or heads.source + heads.count > held or heads.dest + heads.count > room:
        raise TransferRequestError(tid, f"{heads} does not fit the sender's {held} heads and the receiver's {room}")
    return indices, wanted_layers, heads


def land(dest_layer: CacheArray, heads: HeadSlice, dest_block_ids: Sequence[int], blocks: CacheArray) -> None:
    """Copy ``blocks`` (one per destination block, ``heads.count`` heads each, on any device) into those
    blocks' head slice."""
    spans = runs(dest_block_ids)
    adjacent_from = spans[0][0] if len(spans) == 1 else None
    copy_blocks(dest_layer[:, heads.dest : heads.dest + heads.count], dest_block_ids, blocks, adjacent_from)


class GrpcKVChannel:
    """Pulls over the sender's gRPC ``Pull`` stream, chunks under the message-size limit."""

    name = "grpc"

    def __init__(
        self, secret: str, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, tls_root_certificate: bytes | None = None
    ):
        self._secret = secret
        self._max_chunk_bytes = max_chunk_bytes
        self._tls_root = tls_root_certificate
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def pull(
        self, handle, dest_layers, dest_block_ids, block_indices=(), layers=(), stall_timeout_s=5.0, timeout_s=60.0,
        rank=0, heads=None,
    ) -> PullResult:  # fmt: skip
        indices, wanted_layers, heads = check_request(
            handle, dest_layers, dest_block_ids, block_indices, layers, rank, heads
        )
        request = pb.PullRequest(
            wire_version=WIRE_VERSION, transfer_id=handle.transfer_id, block_indices=list(block_indices),
            layers=list(layers), max_chunk_bytes=self._max_chunk_bytes, first_head=heads.source,
            num_heads=heads.count,
        )  # fmt: skip
        pull = self._channel(handle.address(rank)).unary_stream(
            "/pdserve.v1.KVTransfer/Pull", request_serializer=pb.PullRequest.SerializeToString
        )  # chunks decoded by hand (chunk_codec): the payload is copied once, into the cache
        call = pull(request, timeout=timeout_s, metadata=self._metadata(handle))
        watchdog = _StallWatchdog(call, stall_timeout_s)
        landing = _Landing(handle.transfer_id, dest_layers, dest_block_ids, wanted_layers, heads)
        start, received, first_bytes_at = time.perf_counter(), 0, 0.0
        try:
            for message in call:
                watchdog.progress()
                header, data = decode_chunk(message)
                landing.take(header, data)
                received += len(data)
                first_bytes_at = first_bytes_at or time.time()
        except grpc.RpcError as exc:
            raise self._error(handle, rank, exc, watchdog.stalled, stall_timeout_s) from None
        except TransferError:
            call.cancel()  # what already landed is discarded by the caller: the pull failed
            raise
        finally:
            watchdog.stop()
        landing.check_complete()
        seconds = time.perf_counter() - start
        return PullResult(handle.transfer_id, len(indices), len(wanted_layers), received, seconds, first_bytes_at)

    def release(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0, receivers: int = 1):
        return self._control(handle, "Release", timeout_s, rank, receivers)

    def abort(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0) -> TransferStatus:
        return self._control(handle, "Abort", timeout_s, rank)

    def renew(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0) -> TransferStatus:
        return self._control(handle, "Renew", timeout_s, rank)

    def status(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0) -> TransferStatus:
        return self._control(handle, "Status", timeout_s, rank)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def call(self, handle: TransferHandle, method: str, request, timeout_s: float, rank: int = 0):
        """One unary control call to sender rank ``rank`` of ``handle``, failures typed."""
        stub = pb_grpc.KVTransferStub(self._channel(handle.address(rank)))
        try:
            return getattr(stub, method)(request, timeout=timeout_s, metadata=self._metadata(handle))
        except grpc.RpcError as exc:
            raise self._error(handle, rank, exc, False, timeout_s) from None

    def _control(
        self, handle: TransferHandle, method: str, timeout_s: float, rank: int, receivers: int = 0
    ) -> TransferStatus:
        ref = pb.TransferRef(wire_version=WIRE_VERSION, transfer_id=handle.transfer_id, receivers=receivers)
        reply = self.call(handle, method, ref, timeout_s, rank)
        return TransferStatus(
            reply.transfer_id, TransferState(reply.state), reply.detail, reply.lease_remaining_s, reply.bytes_sent,
            reply.layers_ready,
        )  # fmt: skip

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
                if self._tls_root is None:
                    channel = grpc.insecure_channel(address, options=options)
                else:
                    credentials = grpc.ssl_channel_credentials(root_certificates=self._tls_root)
                    channel = grpc.secure_channel(address, credentials, options=options)
                self._channels[address] = channel
        return channel

    def _metadata(self, handle: TransferHandle) -> list[tuple[str, str]]:
        return [(auth.METADATA_KEY, auth.proof(self._secret, handle.transfer_id))]

    @staticmethod
    def _error(handle: TransferHandle, rank: int, exc: grpc.RpcError, stalled: bool, timeout_s: float):
        tid = handle.transfer_id
        if stalled:
            return TransferTimeout(tid, f"no progress for {timeout_s:g} s from {handle.address(rank)}")
        code, detail = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TransferTimeout(tid, f"deadline exceeded: {detail}")
        return BY_CODE.get(code, TransferUnavailable)(tid, f"{code.name}: {detail}")


class _Landing:
    """Where a gRPC pull's chunks land, checked as they come: batches in order, each batch every wanted layer
    in order, each layer's bytes in order and whole, every chunk's checksum."""

    def __init__(self, transfer_id: str, dest_layers, dest_block_ids, wanted_layers: list[int], heads: HeadSlice):
        self._tid = transfer_id
        self._dest_layers = dest_layers
        self._dest_ids = list(dest_block_ids)
        self._layers = wanted_layers
        self._heads = heads
        first = dest_layers[0]
        self._whole = heads.count == first.shape[1]  # every head the receiver holds comes from this rank
        self._cpu = on_host(first)
        self._staging = staging_for(first, len(self._dest_ids), heads.count)  # pinned for a GPU cache
        self._block_bytes = nbytes(self._staging[:1])
        self._position = 0  # of the batch arriving, in the request's blocks
        self._batch = 0  # its block count
        self._layer = 0  # index into ``wanted_layers`` of the layer arriving
        self._filled = 0  # its bytes landed
        self._ids: list[int] = []
        self._target = None
        self._direct = False

    def take(self, header: pb.ChunkHeader, data) -> None:
        if self._filled == 0:
            self._start_layer(header)
        where = f"layer {header.layer}, blocks from {header.first_block}"
        if (
            (header.layer, header.first_block, header.num_blocks)
            != (self._layers[self._layer], self._position, self._batch)
            or len(data) != header.byte_length
            or header.byte_offset != self._filled
        ):
            raise TransferIntegrityError(self._tid, f"{where}: chunk at {header.byte_offset} is out of place")
        if self._filled + len(data) > self._batch * self._block_bytes:
            raise TransferIntegrityError(self._tid, f"{where}: more bytes than the blocks hold")
        if xxhash.xxh3_64_intdigest(data) != header.xxh3_64:
            raise TransferIntegrityError(self._tid, f"{where}: checksum mismatch at byte {header.byte_offset}")
        self._target[header.byte_offset : header.byte_offset + header.byte_length] = data
        self._filled += len(data)
        if self._filled == self._batch * self._block_bytes:
            if not self._direct:
                land(self._dest_layers[header.layer], self._heads, self._ids, self._staging[: self._batch])
            self._filled, self._layer = 0, self._layer + 1
            if self._layer == len(self._layers):
                self._position, self._layer = self._position + self._batch, 0

    def _start_layer(self, header: pb.ChunkHeader) -> None:
        if self._layer == 0:  # a new batch
            if not 0 < header.num_blocks <= len(self._dest_ids) - self._position:
                raise TransferIntegrityError(self._tid, f"a batch of {header.num_blocks} blocks at {self._position}")
            self._batch = header.num_blocks
            self._ids = self._dest_ids[self._position : self._position + self._batch]
        # adjacent destination blocks, whole, one run of host memory: bytes land in the cache itself; else in
        # (pinned) staging
        spans = runs(self._ids)
        layer = self._dest_layers[self._layers[self._layer]]
        in_cache = layer[spans[0][0] : spans[0][0] + self._batch] if len(spans) == 1 else None
        self._direct = self._whole and self._cpu and in_cache is not None and contiguous(in_cache)
        self._target = host_bytes(in_cache if self._direct else self._staging[: self._batch])  # a view of either

    def check_complete(self) -> None:
        if self._position != len(self._dest_ids) or self._filled:
            raise TransferIntegrityError(
                self._tid, f"stream ended after {self._position} of {len(self._dest_ids)} blocks (every layer)"
            )


class _StallWatchdog:
    """Cancels a streaming call that makes no progress for ``stall_s``."""

    def __init__(self, call, stall_s: float):
        self._call = call
        self._stall_s = stall_s
        self._last = time.monotonic()
        self._done = threading.Event()
        self.stalled = False
        threading.Thread(target=self._watch, name="pdserve-pull-watchdog", daemon=True).start()

    def progress(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(0.05, self._stall_s / 4)):
            if time.monotonic() - self._last > self._stall_s:
                self.stalled = True
                self._call.cancel()
                return


class LocalKVChannel:
    """Sender and receiver in one process (tests, co-located mode): a tensor copy, same checks."""

    name = "local"

    def __init__(self, registry: TransferRegistry):
        self._registry = registry

    def pull(
        self, handle, dest_layers, dest_block_ids, block_indices=(), layers=(), stall_timeout_s=5.0, timeout_s=60.0,
        rank=0, heads=None,
    ) -> PullResult:  # fmt: skip
        indices, wanted_layers, heads = check_request(
            handle, dest_layers, dest_block_ids, block_indices, layers, rank, heads
        )
        start, first_bytes_at = time.perf_counter(), 0.0
        offer = self._registry.open_pull(handle.transfer_id, block_indices, layers)
        sent, position = 0, 0
        try:
            while position < len(indices):
                batch = self._registry.next_batch(offer, indices[position:], stall_timeout_s)
                ids = dest_block_ids[position : position + len(batch)]
                for layer in wanted_layers:
                    self._registry.wait_layer_ready(offer, layer, stall_timeout_s, last_block=batch[-1])
                    blocks = concatenate(self._registry.read_blocks(offer, layer, batch, (heads.source, heads.count)))
                    self._registry.check_unfinished(offer)
                    land(dest_layers[layer], heads, ids, blocks)
                    sent += nbytes(blocks)
                    first_bytes_at = first_bytes_at or time.time()
                position += len(batch)
        finally:
            self._registry.close_pull(offer, sent)
        seconds = time.perf_counter() - start
        return PullResult(handle.transfer_id, len(indices), len(wanted_layers), sent, seconds, first_bytes_at)

    def release(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0, receivers: int = 1):
        return self._registry.release(handle.transfer_id, receivers)

    def abort(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0) -> TransferStatus:
        return self._registry.abort(handle.transfer_id)

    def renew(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0) -> TransferStatus:
        return self._registry.renew(handle.transfer_id)
