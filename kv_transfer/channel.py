"""The receiver's side: one ``KVChannel`` interface, a gRPC streaming backend and an in-process one.

A pull writes the requested blocks of every requested layer straight into
destination tensors the receiver reserved (``dest_layers[layer][dest_block_ids]``),
verifying each chunk's length and checksum before it lands. Every pull has a
stall deadline (no chunk for that long: the peer stalled or died) and an
overall deadline; failures are typed ``TransferError``s, never a hang.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch
import xxhash

from kv_transfer import auth
from kv_transfer.chunk_codec import decode_chunk
from kv_transfer.errors import (
    BY_CODE,
    TransferError,
    TransferIntegrityError,
    TransferRequestError,
    TransferTimeout,
    TransferUnavailable,
)
from kv_transfer.transfer import (
    DEFAULT_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    WIRE_VERSION,
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


class KVChannel(Protocol):
    name: str

    def pull(
        self,
        handle: TransferHandle,
        dest_layers: Sequence[torch.Tensor],
        dest_block_ids: Sequence[int],
        block_indices: Sequence[int] = (),
        layers: Sequence[int] = (),
        stall_timeout_s: float = 5.0,
        timeout_s: float = 60.0,
    ) -> PullResult:
        """Copy blocks ``block_indices`` (all when empty) of ``layers`` into ``dest_block_ids``."""

    def release(self, handle: TransferHandle, timeout_s: float = 5.0) -> TransferStatus: ...

    def abort(self, handle: TransferHandle, timeout_s: float = 5.0) -> TransferStatus: ...


def check_request(handle, dest_layers, dest_block_ids, block_indices, layers) -> tuple[list[int], list[int]]:
    indices = list(block_indices) or list(range(handle.num_blocks))
    wanted_layers = list(layers) or list(range(handle.num_layers))
    if len(dest_block_ids) != len(indices):
        raise TransferRequestError(
            handle.transfer_id, f"{len(indices)} blocks requested but {len(dest_block_ids)} destination blocks given"
        )
    if len(dest_layers) != handle.num_layers:
        raise TransferRequestError(handle.transfer_id, f"{len(dest_layers)} destination layers for {handle.num_layers}")
    first = dest_layers[0]
    handle.check_layout(str(first.dtype).removeprefix("torch."), first.shape[1:], len(dest_layers))
    return indices, wanted_layers


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
        self, handle, dest_layers, dest_block_ids, block_indices=(), layers=(), stall_timeout_s=5.0, timeout_s=60.0
    ) -> PullResult:
        indices, wanted_layers = check_request(handle, dest_layers, dest_block_ids, block_indices, layers)
        request = pb.PullRequest(
            wire_version=WIRE_VERSION, transfer_id=handle.transfer_id, block_indices=list(block_indices),
            layers=list(layers), max_chunk_bytes=self._max_chunk_bytes,
        )  # fmt: skip
        pull = self._channel(handle).unary_stream(
            "/pdserve.v1.KVTransfer/Pull", request_serializer=pb.PullRequest.SerializeToString
        )  # chunks decoded by hand (chunk_codec): the payload is copied once, into the cache
        call = pull(request, timeout=timeout_s, metadata=self._metadata(handle))
        watchdog = _StallWatchdog(call, stall_timeout_s)
        dest_runs = runs(dest_block_ids)
        device = dest_layers[0].device
        # adjacent destination blocks in host memory: bytes land in the cache itself; else in (pinned) staging
        direct = len(dest_runs) == 1 and device.type == "cpu"
        dest_ids = torch.tensor(list(dest_block_ids), dtype=torch.long, device=device)
        staging = torch.empty(
            (len(indices), *dest_layers[0].shape[1:]), dtype=dest_layers[0].dtype, pin_memory=device.type == "cuda"
        )
        layer_size = staging.numel() * staging.element_size()
        target = None
        start, received, filled, layers_done = time.perf_counter(), 0, 0, 0
        try:
            for message in call:
                watchdog.progress()
                header, data = decode_chunk(message)
                self._verify(handle, header, data, layer_size, filled)
                if filled == 0:
                    first, count = dest_runs[0]
                    layer_target = dest_layers[header.layer][first : first + count] if direct else staging
                    target = layer_target.view(-1).view(torch.uint8).numpy()
                target[header.byte_offset : header.byte_offset + header.byte_length] = data
                received += header.byte_length
                filled += header.byte_length
                if filled == layer_size:
                    if not direct:
                        dest_layers[header.layer].index_copy_(0, dest_ids, staging.to(device))
                    filled, layers_done = 0, layers_done + 1
        except grpc.RpcError as exc:
            raise self._error(handle, exc, watchdog.stalled, stall_timeout_s) from None
        except TransferError:
            call.cancel()  # what already landed is discarded by the caller: the pull failed
            raise
        finally:
            watchdog.stop()
        if layers_done != len(wanted_layers):
            raise TransferIntegrityError(
                handle.transfer_id, f"stream ended after {layers_done} of {len(wanted_layers)} layers"
            )
        return PullResult(handle.transfer_id, len(indices), layers_done, received, time.perf_counter() - start)

    def release(self, handle: TransferHandle, timeout_s: float = 5.0) -> TransferStatus:
        return self._control(handle, "Release", timeout_s)

    def abort(self, handle: TransferHandle, timeout_s: float = 5.0) -> TransferStatus:
        return self._control(handle, "Abort", timeout_s)

    def status(self, handle: TransferHandle, timeout_s: float = 5.0) -> TransferStatus:
        return self._control(handle, "Status", timeout_s)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def call(self, handle: TransferHandle, method: str, request, timeout_s: float):
        """One unary control call to the sender of ``handle``, failures typed."""
        try:
            return getattr(self._stub(handle), method)(request, timeout=timeout_s, metadata=self._metadata(handle))
        except grpc.RpcError as exc:
            raise self._error(handle, exc, False, timeout_s) from None

    def _control(self, handle: TransferHandle, method: str, timeout_s: float) -> TransferStatus:
        ref = pb.TransferRef(wire_version=WIRE_VERSION, transfer_id=handle.transfer_id)
        reply = self.call(handle, method, ref, timeout_s)
        return TransferStatus(
            reply.transfer_id, TransferState(reply.state), reply.detail, reply.lease_remaining_s, reply.bytes_sent,
            reply.layers_ready,
        )  # fmt: skip

    def _stub(self, handle: TransferHandle) -> pb_grpc.KVTransferStub:
        return pb_grpc.KVTransferStub(self._channel(handle))

    def _channel(self, handle: TransferHandle) -> grpc.Channel:
        address = handle.sender_address
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
    def _verify(handle: TransferHandle, header: pb.ChunkHeader, data, layer_size: int, filled: int) -> None:
        tid = handle.transfer_id
        if len(data) != header.byte_length or header.byte_offset != filled or filled + len(data) > layer_size:
            raise TransferIntegrityError(tid, f"layer {header.layer}: chunk at {header.byte_offset} is out of place")
        if xxhash.xxh3_64_intdigest(data) != header.xxh3_64:
            raise TransferIntegrityError(tid, f"layer {header.layer}: checksum mismatch at byte {header.byte_offset}")

    @staticmethod
    def _error(handle: TransferHandle, exc: grpc.RpcError, stalled: bool, timeout_s: float) -> TransferError:
        tid = handle.transfer_id
        if stalled:
            return TransferTimeout(tid, f"no progress for {timeout_s:g} s from {handle.sender_address}")
        code, detail = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TransferTimeout(tid, f"deadline exceeded: {detail}")
        return BY_CODE.get(code, TransferUnavailable)(tid, f"{code.name}: {detail}")


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
        self, handle, dest_layers, dest_block_ids, block_indices=(), layers=(), stall_timeout_s=5.0, timeout_s=60.0
    ) -> PullResult:
        indices, wanted_layers = check_request(handle, dest_layers, dest_block_ids, block_indices, layers)
        start = time.perf_counter()
        offer = self._registry.open_pull(handle.transfer_id, block_indices, layers)
        sent = 0
        device = dest_layers[0].device
        dest_ids = torch.tensor(list(dest_block_ids), dtype=torch.long, device=device)
        try:
            for layer in wanted_layers:
                self._registry.wait_layer_ready(offer, layer, stall_timeout_s)
                blocks = torch.cat(self._registry.read_blocks(offer, layer, block_indices)).to(device)
                dest_layers[layer].index_copy_(0, dest_ids, blocks)
                sent += blocks.numel() * blocks.element_size()
        finally:
            self._registry.close_pull(offer, sent)
        return PullResult(handle.transfer_id, len(indices), len(wanted_layers), sent, time.perf_counter() - start)

    def release(self, handle: TransferHandle, timeout_s: float = 5.0) -> TransferStatus:
        return self._registry.release(handle.transfer_id)

    def abort(self, handle: TransferHandle, timeout_s: float = 5.0) -> TransferStatus:
        return self._registry.abort(handle.transfer_id)
