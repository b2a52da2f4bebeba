"""The model of a transfer: its handle, its state, and the sender's registry of offers under leases.

One explicit state per transfer (offered → pulling → done / failed / expired /
aborted). The blocks of an offer are freed exactly once, when it reaches a
final state, and never while a pull is reading them: an abort mid-pull stops
the pull at its next chunk and frees the blocks when it has let go, and a
lease that runs out mid-pull expires when that pull ends (each pull has its
own deadline).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.errors import TransferLayoutError, TransferNotFound, TransferRequestError, TransferTimeout
from pdserve_pb.v1 import kv_transfer_pb2 as pb

WIRE_VERSION = pb.WIRE_VERSION_1
DEFAULT_CHUNK_BYTES = 4 << 20  # gRPC chunk size: under the usual 4 MiB message limit, configurable
MAX_MESSAGE_BYTES = 64 << 20  # the largest chunk a peer accepts


class TransferState(enum.IntEnum):
    OFFERED = pb.TRANSFER_STATE_OFFERED
    PULLING = pb.TRANSFER_STATE_PULLING
    DONE = pb.TRANSFER_STATE_DONE
    FAILED = pb.TRANSFER_STATE_FAILED
    EXPIRED = pb.TRANSFER_STATE_EXPIRED
    ABORTED = pb.TRANSFER_STATE_ABORTED

    @property
    def final(self) -> bool:
        return self not in (TransferState.OFFERED, TransferState.PULLING)


@dataclass(frozen=True)
class TransferHandle:
    """Who holds the KV, which blocks, how many tokens, in which layout."""

    sender_address: str
    transfer_id: str
    model_id: str
    block_hashes: tuple[bytes, ...]
    num_tokens: int
    dtype: str
    block_shape: tuple[int, ...]
    num_layers: int
    backends: tuple[str, ...] = ("grpc",)
    cache_layout: str = ""
    wire_version: int = WIRE_VERSION

    def to_proto(self) -> pb.TransferHandle:
        return pb.TransferHandle(
            wire_version=self.wire_version, sender_address=self.sender_address, transfer_id=self.transfer_id,
            model_id=self.model_id, block_hashes=list(self.block_hashes), num_tokens=self.num_tokens,
            dtype=self.dtype, block_shape=list(self.block_shape), num_layers=self.num_layers,
            backends=list(self.backends), cache_layout=self.cache_layout,
        )  # fmt: skip

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> TransferHandle:
        msg = pb.TransferHandle.FromString(data)
        handle = cls(
            msg.sender_address, msg.transfer_id, msg.model_id, tuple(msg.block_hashes), msg.num_tokens, msg.dtype,
            tuple(msg.block_shape), msg.num_layers, tuple(msg.backends), msg.cache_layout, msg.wire_version,
        )  # fmt: skip
        check_wire_version(handle.transfer_id, handle.wire_version)
        return handle

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)

    def check_layout(
        self, dtype: str, block_shape: Sequence[int], num_layers: int, cache_layout: str | None = None
    ) -> None:
        """Refuse a receiver whose KV cache is laid out differently (no conversion is done).

        The tensors give dtype, block shape and layer count; only the engine knows its layout's
        name (e.g. vLLM CPU's ``LBHNC`` vs a GPU layout with the same shape), so it passes it.
        """
        ours = (self.dtype, tuple(self.block_shape), self.num_layers, self.cache_layout)
        theirs = (dtype, tuple(block_shape), num_layers, self.cache_layout if cache_layout is None else cache_layout)
        if ours != theirs:
            raise TransferLayoutError(
                self.transfer_id,
                f"sender layout (dtype, block shape, layers, cache layout) {ours} != receiver layout {theirs}",
            )


def check_wire_version(transfer_id: str, version: int) -> None:
    from kv_transfer.errors import TransferVersionError

    if version > WIRE_VERSION:
        raise TransferVersionError(transfer_id, f"wire version {version} is newer than this peer's {WIRE_VERSION}")


def runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """(first id, length) of each run of consecutive ids, in order: one send or copy per run."""
    out: list[tuple[int, int]] = []
    for block in ids:
        if out and out[-1][0] + out[-1][1] == block:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((block, 1))
    return out


@dataclass
class Offer:
    handle: TransferHandle
    layers: list[torch.Tensor]
    block_ids: list[int]
    lease_deadline: float
    state: TransferState = TransferState.OFFERED
    layers_ready: int = 0
    pulls: int = 0
    bytes_sent: int = 0
    detail: str = ""
    changed: threading.Condition = field(default_factory=threading.Condition)


@dataclass(frozen=True)
class TransferStatus:
    transfer_id: str
    state: TransferState
    detail: str = ""
    lease_remaining_s: float = 0.0
    bytes_sent: int = 0
    layers_ready: int = 0


@dataclass(frozen=True)
class RegistryStats:
    open: dict[str, int]
    finished: dict[str, int]
    bytes_sent: int


_ABORTED_EARLY = "aborted before it was offered"


class TransferRegistry:
    """The sender's offers. ``on_freed(transfer_id, state)`` runs once per offer, when its blocks may be freed."""

    _TOMBSTONES = 4096  # final states remembered for status queries

    def __init__(
        self,
        address: str,
        model_id: str,
        lease_s: float = 30.0,
        on_freed: Callable[[str, TransferState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.address = address
        self.model_id = model_id
        self.lease_s = lease_s
        self._on_freed = on_freed
        self._clock = clock
        self._lock = threading.Lock()
        self._offered = threading.Condition(self._lock)
        self._offers: dict[str, Offer] = {}
        self._final: OrderedDict[str, TransferStatus] = OrderedDict()
        self._finished: Counter[str] = Counter()
        self._bytes_sent = 0
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="pdserve-lease-reaper", daemon=True)
        self._reaper.start()

    def offer(
        self,
        transfer_id: str,
        layers: list[torch.Tensor],
        block_ids: Sequence[int],
        block_hashes: Sequence[bytes],
        num_tokens: int,
        cache_layout: str = "",
        backends: Sequence[str] = ("grpc",),
        layers_ready: int | None = None,
        lease_s: float | None = None,
    ) -> TransferHandle:
        """Hold ``block_ids`` of every layer tensor under a lease; ``layers_ready`` < all for layer-wise pulls."""
        if len(block_ids) != len(block_hashes):
            raise ValueError(f"{len(block_ids)} block ids but {len(block_hashes)} block hashes")
        first = layers[0]
        handle = TransferHandle(
            self.address, transfer_id, self.model_id, tuple(block_hashes), num_tokens,
            str(first.dtype).removeprefix("torch."), tuple(first.shape[1:]), len(layers), tuple(backends), cache_layout,
        )  # fmt: skip
        offer = Offer(
            handle,
            layers,
            list(block_ids),
            self._clock() + (self.lease_s if lease_s is None else lease_s),
            layers_ready=len(layers) if layers_ready is None else layers_ready,
        )
        with self._lock:
            final = self._final.get(transfer_id)
            if final is not None and final.detail == _ABORTED_EARLY:
                raise ValueError(f"transfer {transfer_id} was {_ABORTED_EARLY}")
            if transfer_id in self._offers or final is not None:
                raise ValueError(f"transfer {transfer_id} was offered already")
            self._offers[transfer_id] = offer
            self._offered.notify_all()
        return handle

    def await_offer(self, transfer_id: str, timeout_s: float) -> None:
        """Wait for an announced transfer to be offered: a handle may reach the receiver first."""
        with self._offered:
            self._offered.wait_for(lambda: transfer_id in self._offers or transfer_id in self._final, timeout_s)

    def mark_layer_ready(self, transfer_id: str, layer: int) -> None:
        offer = self._get(transfer_id)
        with offer.changed:
            offer.layers_ready = max(offer.layers_ready, layer + 1)
            offer.changed.notify_all()

    def open_pull(self, transfer_id: str, block_indices: Sequence[int], layers: Sequence[int]) -> Offer:
        """Start reading an offer; pair with ``close_pull``. Empty indices / layers mean all."""
        offer = self._get(transfer_id)
        if any(not 0 <= i < len(offer.block_ids) for i in block_indices):
            raise TransferRequestError(transfer_id, f"block indices must be in [0, {len(offer.block_ids)})")
        if any(not 0 <= layer < len(offer.layers) for layer in layers):
            raise TransferRequestError(transfer_id, f"layers must be in [0, {len(offer.layers)})")
        with offer.changed:
            if offer.state.final:
                raise TransferNotFound(transfer_id, f"already {offer.state.name.lower()}")
            offer.pulls += 1
            offer.state = TransferState.PULLING
        return offer

    def close_pull(self, offer: Offer, sent_bytes: int) -> None:
        with offer.changed:
            offer.pulls -= 1
            offer.bytes_sent += sent_bytes
            with self._lock:
                self._bytes_sent += sent_bytes
            if offer.pulls:
                return
            if offer.state == TransferState.PULLING:
                offer.state = TransferState.OFFERED
            finished = offer.state.final
        if finished:
            self._free(offer)  # it was finished while this pull read it
        elif self._clock() >= offer.lease_deadline:
            self._finish(offer.handle.transfer_id, TransferState.EXPIRED, "lease ran out during a pull")

    def wait_layer_ready(self, offer: Offer, layer: int, timeout_s: float, gone: threading.Event | None = None) -> bool:
        """Wait until ``layer`` may be read; False when the reader is ``gone`` meanwhile."""
        gone = gone or threading.Event()

        def readable() -> bool:
            return offer.layers_ready > layer or offer.state.final or gone.is_set()

        with offer.changed:
            if not offer.changed.wait_for(readable, timeout_s):
                raise TransferTimeout(offer.handle.transfer_id, f"layer {layer} not ready within {timeout_s:g} s")
            if gone.is_set():
                return False
            if offer.state.final:
                raise TransferNotFound(offer.handle.transfer_id, f"{offer.state.name.lower()} while being pulled")
        return True

    def wake(self, offer: Offer) -> None:
        """Wake whoever waits on ``offer`` (a reader went away)."""
        with offer.changed:
            offer.changed.notify_all()

    def read_blocks(self, offer: Offer, layer: int, block_indices: Sequence[int]) -> list[torch.Tensor]:
        """The requested blocks of one layer, in request order, as views of each run of adjacent blocks.

        Views, not copies: the blocks cannot be freed while a pull is open on them.
        """
        if offer.state.final:
            raise TransferNotFound(offer.handle.transfer_id, f"{offer.state.name.lower()} while being pulled")
        ids = [offer.block_ids[i] for i in block_indices] if block_indices else offer.block_ids
        tensor = offer.layers[layer]
        return [tensor[start : start + length] for start, length in runs(ids)]

    def release(self, transfer_id: str) -> TransferStatus:
        return self._finish(transfer_id, TransferState.DONE, "released by the receiver")

    def abort(self, transfer_id: str) -> TransferStatus:
        """Free an offer; an abort that comes before its offer (the handle went out up front) is kept,
        so the offer, when it comes, is refused and its blocks are freed at once, not at lease expiry."""
        with self._lock:
            if transfer_id not in self._offers and transfer_id not in self._final:
                status = TransferStatus(transfer_id, TransferState.ABORTED, _ABORTED_EARLY)
                self._remember(status)
                self._offered.notify_all()
                return status
        return self._finish(transfer_id, TransferState.ABORTED, "aborted")

    def status(self, transfer_id: str) -> TransferStatus:
        found = self._lookup(transfer_id)
        return found if isinstance(found, TransferStatus) else self._status(found)

    def stats(self) -> RegistryStats:
        """Counts for metrics: open transfers by state, finished ones by final state, bytes sent."""
        with self._lock:
            open_states = Counter(offer.state.name.lower() for offer in self._offers.values())
            return RegistryStats(dict(open_states), dict(self._finished), self._bytes_sent)

    def active(self) -> list[str]:
        with self._lock:
            return list(self._offers)

    def close(self) -> None:
        self._stop.set()
        self._reaper.join(timeout=2)
        for transfer_id in self.active():
            self._finish(transfer_id, TransferState.ABORTED, "sender shut down")

    def _status(self, offer: Offer) -> TransferStatus:
        return TransferStatus(
            offer.handle.transfer_id,
            offer.state,
            offer.detail,
            max(0.0, offer.lease_deadline - self._clock()) if not offer.state.final else 0.0,
            offer.bytes_sent,
            offer.layers_ready,
        )

    def _get(self, transfer_id: str) -> Offer:
        with self._lock:
            offer = self._offers.get(transfer_id)
            final = self._final.get(transfer_id)
        if offer is None:
            raise TransferNotFound(transfer_id, f"already {final.state.name.lower()}" if final else "unknown transfer")
        return offer

    def _lookup(self, transfer_id: str) -> TransferStatus | Offer:
        """A finished transfer's final status, else its open offer."""
        with self._lock:
            found = self._final.get(transfer_id) or self._offers.get(transfer_id)
        if found is None:
            raise TransferNotFound(transfer_id, "unknown transfer")
        return found

    def _finish(self, transfer_id: str, state: TransferState, detail: str) -> TransferStatus:
        """Move to a final state once; later calls answer the state it reached."""
        offer = self._lookup(transfer_id)
        if isinstance(offer, TransferStatus):
            return offer
        with offer.changed:
            if offer.state.final or (state == TransferState.EXPIRED and offer.pulls):
                return self._status(offer)  # finishing already, or expires when the running pull ends
            offer.state, offer.detail = state, detail
            offer.changed.notify_all()
            reading = offer.pulls
        if reading:
            return self._status(offer)  # freed by the last close_pull
        return self._free(offer)

    def _free(self, offer: Offer) -> TransferStatus:
        transfer_id = offer.handle.transfer_id
        status = self._status(offer)
        with self._lock:
            if self._offers.pop(transfer_id, None) is None:
                return self._final[transfer_id]
            self._remember(status)
        offer.layers = []  # drop the references to the KV tensors
        if self._on_freed is not None:
            self._on_freed(transfer_id, offer.state)
        return status

    def _remember(self, status: TransferStatus) -> None:
        """Record a final state (the lock held)."""
        self._final[status.transfer_id] = status
        self._finished[status.state.name.lower()] += 1
        while len(self._final) > self._TOMBSTONES:
            self._final.popitem(last=False)

    def _reap(self) -> None:
        while not self._stop.wait(0.05):
            now = self._clock()
            with self._lock:
                due = [tid for tid, o in self._offers.items() if o.lease_deadline <= now and not o.pulls]
            for transfer_id in due:
                try:
                    self._finish(transfer_id, TransferState.EXPIRED, "lease expired")
                except TransferNotFound:
                    pass
