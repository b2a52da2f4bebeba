"""The model of a transfer: its handle, its state, and the sender's registry of offers under leases.

One explicit state per transfer (offered → pulling → done / failed / expired /
aborted). The blocks of an offer are freed exactly once, when it reaches a
final state, and never while a pull is reading them: an abort mid-pull stops
the pull at its next chunk and frees the blocks when it has let go, and a
lease that runs out mid-pull expires when that pull ends (each pull has its
own deadline).

An offer may be made before its KV exists and grow while the prompt is
computed, chunk by chunk (a prompt longer than the engine's token budget per
step): each step that computes blocks adds a *segment* of them, whose layers
become readable one by one as the step saves them; every earlier segment is
whole. A pull is served segment by segment (``next_batch``), each batch layer by
layer, so the receiver takes the first chunk's KV while later chunks run.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kv_transfer.cache_arrays import CacheArray, dtype_name  # offers hold the engine's cache, only indexed here
from kv_transfer.errors import (
    TransferLayoutError,
    TransferNotFound,
    TransferRequestError,
    TransferTimeout,
    TransferVersionError,
)
from pdserve_pb.v1 import kv_transfer_pb2 as pb

WIRE_VERSION = pb.WIRE_VERSION_4
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
class KVFingerprint:
    """What makes two engines' KV interchangeable (the compatibility handshake).

    A receiver compares the sender's with its own before it pulls and refuses any
    difference, naming both: KV of another model, checkpoint, dtype, block size or
    layout lands as garbage that still decodes with status 200. Per-rank shapes are not
    in it: engines of different tensor-parallel sizes hold different head counts per
    rank and exchange head slices (``head_pulls``).
    """

    model_id: str
    weights: str = ""  # checkpoint digest (``kv_transfer.fingerprint.weights_digest``)
    dtype: str = ""
    num_layers: int = 0
    num_kv_heads: int = 0  # the model's, over all ranks
    head_shape: tuple[int, ...] = ()  # one block of one KV head
    cache_layout: str = ""
    hash_scheme: int = 0  # pdserve's block-hash scheme version

    def to_proto(self) -> pb.KVFingerprint:
        return pb.KVFingerprint(
            model_id=self.model_id, weights=self.weights, dtype=self.dtype, num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads, head_shape=list(self.head_shape), cache_layout=self.cache_layout,
            hash_scheme=self.hash_scheme,
        )  # fmt: skip

    @classmethod
    def from_proto(cls, msg: pb.KVFingerprint) -> KVFingerprint:
        return cls(
            msg.model_id, msg.weights, msg.dtype, msg.num_layers, msg.num_kv_heads, tuple(msg.head_shape),
            msg.cache_layout, msg.hash_scheme,
        )  # fmt: skip

    def differences(self, other: KVFingerprint) -> list[str]:
        """The fields that differ, each as ``name: ours != theirs``."""
        return [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        ]

    def check_compatible(self, transfer_id: str, receiver: KVFingerprint) -> None:
        """Refuse a receiver whose KV is not interchangeable with this (the sender's)."""
        if self != receiver:
            raise TransferLayoutError(
                transfer_id,
                f"incompatible KV: sender {self} vs receiver {receiver} ({'; '.join(self.differences(receiver))})",
            )


@dataclass(frozen=True)
class SenderRank:
    """One tensor-parallel rank of a sender: where it serves, and the model's KV heads it holds."""

    address: str
    first_head: int
    num_heads: int

    @property
    def heads(self) -> range:
        return range(self.first_head, self.first_head + self.num_heads)


@dataclass(frozen=True)
class HeadSlice:
    """``count`` KV heads, from the sender rank's local head ``source`` to the receiver's local head ``dest``."""

    source: int
    dest: int
    count: int


def rank_heads(rank: int, tp_size: int, num_kv_heads: int) -> range:
    """The model's KV heads a tensor-parallel rank holds, as vLLM shards them: a share of the heads, or, with
    more ranks than heads, one head replicated over ``tp_size // num_kv_heads`` ranks."""
    if tp_size <= num_kv_heads:
        per_rank = num_kv_heads // tp_size
        return range(rank * per_rank, (rank + 1) * per_rank)
    head = rank // (tp_size // num_kv_heads)
    return range(head, head + 1)


def head_pulls(senders: Sequence[SenderRank], wanted: range) -> list[tuple[int, HeadSlice]]:
    """Which sender ranks a receiver rank holding heads ``wanted`` pulls from, and which heads from each:
    every wanted head once, from the first rank that holds it (replicated heads are read once)."""
    pulls, covered = [], set()
    for index, sender in enumerate(senders):
        start, stop = max(sender.first_head, wanted.start), min(sender.heads.stop, wanted.stop)
        if start >= stop or set(range(start, stop)) <= covered:
            continue
        pulls.append((index, HeadSlice(start - sender.first_head, start - wanted.start, stop - start)))
        covered.update(range(start, stop))
    if covered != set(wanted):
        raise ValueError(f"the sender's ranks {list(senders)} do not hold heads {sorted(set(wanted) - covered)}")
    return pulls


@dataclass(frozen=True)
class TransferHandle:
    """Which transfer, which blocks and tokens, what KV (its fingerprint), and which ranks serve which heads."""

    transfer_id: str
    block_hashes: tuple[bytes, ...]
    num_tokens: int
    fingerprint: KVFingerprint
    ranks: tuple[SenderRank, ...]
    backends: tuple[str, ...] = ("grpc",)
    wire_version: int = WIRE_VERSION

    def to_proto(self) -> pb.TransferHandle:
        return pb.TransferHandle(
            wire_version=self.wire_version, transfer_id=self.transfer_id, block_hashes=list(self.block_hashes),
            num_tokens=self.num_tokens, backends=list(self.backends), fingerprint=self.fingerprint.to_proto(),
            ranks=[pb.SenderRank(address=r.address, first_head=r.first_head, num_heads=r.num_heads)
                   for r in self.ranks],
        )  # fmt: skip

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> TransferHandle:
        msg = pb.TransferHandle.FromString(data)
        check_wire_version(msg.transfer_id, msg.wire_version)
        return cls(
            msg.transfer_id, tuple(msg.block_hashes), msg.num_tokens, KVFingerprint.from_proto(msg.fingerprint),
            tuple(SenderRank(r.address, r.first_head, r.num_heads) for r in msg.ranks), tuple(msg.backends),
            msg.wire_version,
        )  # fmt: skip

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)

    @property
    def model_id(self) -> str:
        return self.fingerprint.model_id

    @property
    def dtype(self) -> str:
        return self.fingerprint.dtype

    @property
    def num_layers(self) -> int:
        return self.fingerprint.num_layers

    def address(self, rank: int = 0) -> str:
        return self.ranks[rank].address

    def block_shape(self, rank: int = 0) -> tuple[int, ...]:
        """One block of one layer on sender rank ``rank``: its heads, then one head's block."""
        return (self.ranks[rank].num_heads, *self.fingerprint.head_shape)

    def with_address(self, address: str, rank: int = 0) -> TransferHandle:
        """The same transfer, served for ``rank`` at another address (a proxy in tests)."""
        ranks = list(self.ranks)
        ranks[rank] = dataclasses.replace(ranks[rank], address=address)
        return dataclasses.replace(self, ranks=tuple(ranks))


def check_wire_version(transfer_id: str, version: int) -> None:
    if version != WIRE_VERSION:
        raise TransferVersionError(transfer_id, f"wire version {version}; this peer speaks {WIRE_VERSION}")


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
    """An offer's blocks, how far they are computed, and who reads it.

    Blocks ``[0, complete)`` are readable at every layer; blocks ``[complete, offered)`` (the segment the
    engine is computing) at layers below ``layers_ready``, every layer once its step has saved them all;
    blocks from ``offered`` on are not computed yet (``block_ids`` may already name some: a block the last
    chunk filled only in part).
    """

    handle: TransferHandle
    layers: list[CacheArray]
    block_ids: list[int]
    lease_deadline: float
    offered: int = 0
    complete: int = 0
    state: TransferState = TransferState.OFFERED
    layers_ready: int = 0
    last_step_at: float = 0.0  # wall clock when the step computing its last blocks began
    computed_at: float = 0.0  # wall clock when every layer of every block was in the cache
    pulls: int = 0
    releases: int = 0  # receiver ranks that released it, of the ``receivers`` each release names
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
    last_step_at: float = 0.0
    computed_at: float = 0.0


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
        layers: list[CacheArray],
        block_ids: Sequence[int],
        block_hashes: Sequence[bytes],
        num_tokens: int,
        cache_layout: str = "",
        backends: Sequence[str] = ("grpc",),
        layers_ready: int | None = None,
        lease_s: float | None = None,
        segment: int | None = None,
    ) -> TransferHandle:
        """Hold ``block_ids`` of every layer tensor under a lease.

        ``block_hashes`` has one entry per block of the transfer; ``block_ids`` names all of them, or, for a
        prompt computed chunk by chunk, those allocated so far (``extend`` adds the rest). The first
        ``segment`` blocks (default: all) are being computed, readable at layers below ``layers_ready``
        (default: all, the KV is there). The handle returned describes this one sender (tests and
        single-rank use): all its heads, its address.
        """
        segment = len(block_hashes) if segment is None else segment
        if not segment <= len(block_ids) <= len(block_hashes):
            raise ValueError(
                f"{len(block_ids)} block ids for {len(block_hashes)} blocks, {segment} of them computed: "
                "need computed <= ids <= blocks"
            )
        first = layers[0]
        fingerprint = KVFingerprint(
            self.model_id, dtype=dtype_name(first), num_layers=len(layers),
            num_kv_heads=first.shape[1], head_shape=tuple(first.shape[2:]), cache_layout=cache_layout,
        )  # fmt: skip
        rank = SenderRank(self.address, 0, first.shape[1])
        handle = TransferHandle(transfer_id, tuple(block_hashes), num_tokens, fingerprint, (rank,), tuple(backends))
        offer = Offer(
            handle,
            layers,
            list(block_ids),
            self._clock() + (self.lease_s if lease_s is None else lease_s),
            offered=segment,
            layers_ready=len(layers) if layers_ready is None else layers_ready,
        )
        self._note_computed(offer)
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
        """``layer`` of the segment being computed is in the cache."""
        offer = self._get(transfer_id)
        with offer.changed:
            offer.layers_ready = max(offer.layers_ready, layer + 1)
            self._note_computed(offer)
            offer.changed.notify_all()

    @staticmethod
    def _note_computed(offer: Offer) -> None:
        """Note when the step computing the last blocks began, and when they were all in the cache."""
        if offer.offered == offer.handle.num_blocks:
            offer.last_step_at = offer.last_step_at or time.time()
            if offer.layers_ready >= len(offer.layers):
                offer.computed_at = offer.computed_at or time.time()

    def extend(self, transfer_id: str, block_ids: Sequence[int], segment_end: int) -> None:
        """The next chunk of the prompt runs: ``block_ids`` are allocated after those offered, and blocks up to
        ``segment_end`` are being computed now (their layers marked ready as they are saved). The segment
        before is whole: its step has ended."""
        offer = self._get(transfer_id)
        with offer.changed:
            ids = offer.block_ids + list(block_ids)
            if not offer.offered <= segment_end <= len(ids) <= offer.handle.num_blocks:
                raise ValueError(
                    f"transfer {transfer_id}: segment to block {segment_end} with {len(ids)} block ids, "
                    f"{offer.offered} offered, of {offer.handle.num_blocks}"
                )
            offer.block_ids = ids
            offer.complete, offer.offered, offer.layers_ready = offer.offered, segment_end, 0
            self._note_computed(offer)
            offer.changed.notify_all()

    def open_pull(self, transfer_id: str, block_indices: Sequence[int], layers: Sequence[int]) -> Offer:
        """Start reading an offer; pair with ``close_pull``. Empty indices / layers mean all; indices ascend."""
        offer = self._get(transfer_id)
        blocks = offer.handle.num_blocks
        if any(not 0 <= i < blocks for i in block_indices):
            raise TransferRequestError(transfer_id, f"block indices must be in [0, {blocks})")
        if any(a >= b for a, b in itertools.pairwise(block_indices)):
            raise TransferRequestError(transfer_id, "block indices must ascend")
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
            offer.changed.notify_all()  # a withdrawal may wait for the last reader
            if offer.state == TransferState.PULLING:
                offer.state = TransferState.OFFERED
            finished = offer.state.final
        if finished:
            self._free(offer)  # it was finished while this pull read it
        elif self._clock() >= offer.lease_deadline:
            self._finish(offer.handle.transfer_id, TransferState.EXPIRED, "lease ran out during a pull")

    def next_batch(
        self, offer: Offer, block_indices: Sequence[int], timeout_s: float, gone: threading.Event | None = None
    ) -> list[int]:
        """The leading ``block_indices`` (ascending) the engine has computed or is computing, once there is at
        least one: what a pull sends next, layer by layer. Empty when the reader is ``gone`` meanwhile."""
        gone = gone or threading.Event()
        with offer.changed:
            self._wait(offer, lambda: offer.offered > block_indices[0], timeout_s, gone, f"block {block_indices[0]}")
            if gone.is_set():
                return []
            return [i for i in block_indices if i < offer.offered]

    def wait_layer_ready(
        self, offer: Offer, layer: int, timeout_s: float, gone: threading.Event | None = None, last_block: int = -1
    ) -> bool:
        """Wait until ``layer`` of the blocks up to index ``last_block`` (default: the offer's last) may be read;
        False when the reader is ``gone`` meanwhile."""
        gone = gone or threading.Event()
        last = offer.handle.num_blocks - 1 if last_block < 0 else last_block

        def readable() -> bool:
            return last < offer.complete or (last < offer.offered and layer < offer.layers_ready)

        with offer.changed:
            self._wait(offer, readable, timeout_s, gone, f"layer {layer} of block {last}")
        return not gone.is_set()

    @staticmethod
    def _wait(offer: Offer, ready: Callable[[], bool], timeout_s: float, gone: threading.Event, what: str) -> None:
        """Wait (``offer.changed`` held) until ``ready``, the reader is ``gone``, or the offer is finished."""
        if not offer.changed.wait_for(lambda: ready() or offer.state.final or gone.is_set(), timeout_s):
            raise TransferTimeout(offer.handle.transfer_id, f"{what} not computed within {timeout_s:g} s")
        if offer.state.final and not gone.is_set():
            raise TransferNotFound(offer.handle.transfer_id, f"{offer.state.name.lower()} while being pulled")

    def check_unfinished(self, offer: Offer) -> None:
        """Raise when ``offer`` was finished while a pull read it: a withdrawn offer's blocks (``withdraw``)
        are reused by the engine's next step, so what was read may be stale."""
        if offer.state.final:
            raise TransferNotFound(offer.handle.transfer_id, f"{offer.state.name.lower()} while being pulled")

    def wake(self, offer: Offer) -> None:
        """Wake whoever waits on ``offer`` (a reader went away)."""
        with offer.changed:
            offer.changed.notify_all()

    def read_blocks(
        self, offer: Offer, layer: int, block_indices: Sequence[int], heads: tuple[int, int] | None = None
    ) -> list[CacheArray]:
        """The requested blocks of one layer, in request order, as views of each run of adjacent blocks;
        ``heads`` (first, count) narrows them to those KV heads (a view that is not contiguous).

        Views, not copies: the blocks cannot be freed while a pull is open on them.
        """
        if offer.state.final:
            raise TransferNotFound(offer.handle.transfer_id, f"{offer.state.name.lower()} while being pulled")
        ids = [offer.block_ids[i] for i in block_indices] if block_indices else offer.block_ids
        tensor = offer.layers[layer]
        if heads is not None and heads != (0, tensor.shape[1]):
            first, count = heads
            return [tensor[start : start + length, first : first + count] for start, length in runs(ids)]
        return [tensor[start : start + length] for start, length in runs(ids)]

    def check_heads(self, offer: Offer, first: int, count: int) -> tuple[int, int]:
        """(first, count) of the heads a pull asks for, checked; count 0 means all this sender holds."""
        held = offer.layers[0].shape[1] if offer.layers else 0
        count = count or held - first
        if first < 0 or count <= 0 or first + count > held:
            raise TransferRequestError(offer.handle.transfer_id, f"heads [{first}, {first + count}) of {held} held")
        return first, count

    def release(self, transfer_id: str, receivers: int = 1) -> TransferStatus:
        """One receiver rank is done; the offer is freed when the last of ``receivers`` ranks is."""
        offer = self._lookup(transfer_id)
        if isinstance(offer, Offer) and receivers > 1:
            with offer.changed:
                offer.releases += 1
                if offer.releases < receivers and not offer.state.final:
                    return self._status(offer)
        return self._finish(transfer_id, TransferState.DONE, "released by the receiver")

    def renew(self, transfer_id: str) -> TransferStatus:
        """The puller is alive and still wants the blocks: the lease runs ``lease_s`` from now. A finished
        transfer answers its final state (nothing to renew)."""
        offer = self._lookup(transfer_id)
        if isinstance(offer, TransferStatus):
            return offer
        with offer.changed:
            if not offer.state.final:
                offer.lease_deadline = max(offer.lease_deadline, self._clock() + self.lease_s)
            return self._status(offer)

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

    def withdraw(self, transfer_id: str, timeout_s: float) -> bool:
        """Abort an offer whose blocks the engine has taken back (its request was preempted), and wait until no
        pull reads them, before the engine's next step writes them. False when a reader still held them after
        ``timeout_s`` (each pull stops at its next chunk, so only a stuck one does)."""
        self.abort(transfer_id)
        with self._lock:
            offer = self._offers.get(transfer_id)
        if offer is None:
            return True
        with offer.changed:
            return offer.changed.wait_for(lambda: offer.pulls == 0, timeout_s)

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
            offer.last_step_at,
            offer.computed_at,
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
