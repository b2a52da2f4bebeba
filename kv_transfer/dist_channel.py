"""The torch.distributed channel: KV bytes over a two-rank process group per (sender, receiver) pair.

No global default group: a worker talks to many peers, so each pair gets its own
``ProcessGroupGloo`` (CPU tensors) or ``ProcessGroupNCCL`` (CUDA tensors), made on
first use through a rendezvous in the sender's ``TCPStore`` and cached (vLLM's
stateless groups are the model). Control goes over gRPC (``PullDist`` returns
where to meet, which blocks and which tags); bytes go over the group, one send
per run of adjacent blocks per layer, followed by that layer's checksum. A plan
covers the requested blocks the prefill has computed or is computing; for a
prompt computed chunk by chunk, the receiver asks again for the rest, so the
first chunks travel while later ones run. Group creation and every send/recv
run under a timeout; a group that failed is dropped and the next pull builds a
new one under a new key. The receiver makes its groups on a thread of their own
and waits for them under the pull's deadline: joining the sender's ``TCPStore``
waits for the store's first answer with no deadline of its own (torch 2.13,
``TCPStore::ping``), so a sender whose store thread never answers held a pull
there for good.

Plans of one pair run one at a time, in the same order on both ends: the
receiver holds the pair's lock from its PullDist call to the plan's last
receive, and the sender pushes each receiver's plans from one FIFO thread.

A pull's result says where its time went (``PHASES``), so a slow pull can be told apart: waiting for the
pair, for plans, for the group's set-up, for the bytes, or checking and landing them. A failed pull raises
and reports none.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta

import torch
import torch.distributed as dist
import xxhash

from kv_transfer.channel import GrpcKVChannel, PullResult, check_request, land
from kv_transfer.errors import TransferError, TransferIntegrityError, TransferTimeout
from kv_transfer.transfer import WIRE_VERSION, HeadSlice, TransferHandle, TransferRegistry, runs
from pdserve_pb.v1 import kv_transfer_pb2 as pb

log = logging.getLogger(__name__)

SENDER_RANK, RECEIVER_RANK = 0, 1
# a pull's time: waiting for the pair's lock, for plans, for the group's set-up, for the bytes; checking and landing
PHASES = ("pair", "plan", "group", "receive", "land")


def _new_group(store: dist.Store, key: str, rank: int, device: str, timeout_s: float):
    prefixed = dist.PrefixStore(key, store)
    timeout = timedelta(seconds=timeout_s)
    if device == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, options)
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)


def _checksum(parts: list[torch.Tensor]) -> torch.Tensor:
    """A one-element int64 tensor on the parts' device, over their bytes in order: XXH3-64 for host tensors
    (Gloo); for GPU tensors (NCCL) ``word_sum``, on the GPU, where XXH3 would copy every layer to the host at
    both ends and hash it there, at a small fraction of the speed NCCL moves it."""
    if parts[0].device.type == "cuda":
        return word_sum(parts)
    hasher = xxhash.xxh3_64()
    for part in parts:
        hasher.update(part.contiguous().view(-1).view(torch.uint8).cpu().numpy())
    return torch.tensor([hasher.intdigest() - 2**63], dtype=torch.int64, device=parts[0].device)


_ODD_MULTIPLIER = 0x9E3779B97F4A7C15 - 2**64  # 2**64 over the golden ratio, odd, as a signed int64
_WORDS_AT_ONCE = 1 << 22  # ~128 MiB of int64 temporaries at most (words, positions, weights, products)


def word_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum, mod 2**64, of the parts' 32-bit words (of a part's bytes, where its size is not a multiple of 4),
    each times an odd weight set by its position across the parts: any one word changed changes the sum (an odd
    weight times a difference under 2**32 is never 0 mod 2**64), and so do most reorderings. Integer sums are
    exact in any order, so the same parts give the same sum at both ends, on any device."""
    total = torch.zeros(1, dtype=torch.int64, device=parts[0].device)
    position = 0
    for part in parts:
        flat = part.contiguous().view(-1).view(torch.uint8)
        if flat.storage_offset() % 4:  # words are read from 4-byte-aligned memory: the same bytes, wherever they lie
            flat = flat.clone()
        words = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
        for start in range(0, words.numel(), _WORDS_AT_ONCE):
            piece = words[start : start + _WORDS_AT_ONCE].to(torch.int64)
            at = torch.arange(position, position + piece.numel(), dtype=torch.int64, device=piece.device)
            total += (piece * ((2 * at + 1) * _ODD_MULTIPLIER)).sum()
            position += piece.numel()
    return total


def _settle(works: list, timeout_s: float) -> None:
    """Wait (under one deadline) for posted sends to complete or fail, whichever: only that they end."""
    deadline = time.monotonic() + timeout_s
    for work in works:
        try:
            work.wait(timedelta(seconds=max(0.0, deadline - time.monotonic())))
        except Exception:  # a failed send has let go of its buffer too
            pass


class DistSender:
    """The sender's half: serves ``PullDist`` plans and pushes the bytes from a worker thread."""

    def __init__(self, registry: TransferRegistry, host: str, timeout_s: float = 5.0):
        self._registry = registry
        self._host = host
        self._timeout_s = timeout_s
        self._store: dist.TCPStore | None = None
        self._groups: dict[str, tuple[str, object]] = {}  # receiver id → (group key, group)
        self._pushers: dict[str, ThreadPoolExecutor] = {}  # receiver id → its FIFO pusher
        self._lock = threading.Lock()
        self._next_tag = 1

    def plan(self, request: pb.DistPullRequest, wait_s: float, caller_waits: Callable[[], bool]) -> pb.DistPlan:
        """The next batch's plan, its push queued; ``wait_s`` for the batch to be computed, at most (the
        caller's deadline), and no push for a caller that stopped waiting meanwhile."""
        pull = request.pull
        offer = self._registry.open_pull(pull.transfer_id, pull.block_indices, pull.layers)
        try:
            heads = self._registry.check_heads(offer, pull.first_head, pull.num_heads)
            indices = list(pull.block_indices) or list(range(offer.handle.num_blocks))
            batch = self._registry.next_batch(offer, indices, wait_s)
            if not caller_waits():
                raise TransferTimeout(pull.transfer_id, "the receiver stopped waiting for the plan")
            key = self._group_key(request.receiver_id)
            layers = list(pull.layers) or list(range(len(offer.layers)))
            run_lengths = [length for _, length in runs([offer.block_ids[i] for i in batch])]
            with self._lock:  # each plan its own tags: sends of an abandoned plan never meet a later one's receives
                tag_base = self._next_tag
                self._next_tag += (len(offer.layers) + 1) * (len(run_lengths) + 1)
            backend = "nccl" if request.device == "cuda" else "gloo"
        except BaseException:
            self._registry.close_pull(offer, 0)
            raise
        with self._lock:
            pusher = self._pushers.get(request.receiver_id)
            if pusher is None:
                pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-kv-dist-send")
                self._pushers[request.receiver_id] = pusher
        plan = pb.DistPlan(
            store_host=self._host, store_port=self._store.port, group_key=key, tag_base=tag_base,
            backend=backend, layers=layers, run_lengths=run_lengths, num_blocks=len(batch),
        )  # fmt: skip
        pusher.submit(self._push, offer, request, plan, batch, heads)
        return plan

    def close(self) -> None:
        with self._lock:
            pushers, self._pushers = list(self._pushers.values()), {}
        for pusher in pushers:
            pusher.shutdown(wait=False, cancel_futures=True)

    def _group_key(self, receiver_id: str) -> str:
        with self._lock:
            if self._store is None:
                self._store = dist.TCPStore(self._host, 0, is_master=True, wait_for_workers=False)
            if receiver_id not in self._groups:  # the group is made by the first push; its key is fixed now
                self._groups[receiver_id] = (f"{receiver_id}/{uuid.uuid4().hex[:8]}", None)
            return self._groups[receiver_id][0]

    def _group(self, receiver_id: str, key: str, device: str):
        with self._lock:
            known = self._groups.get(receiver_id)
        if known and known[0] == key and known[1] is not None:
            return known[1]
        group = _new_group(self._store, key, SENDER_RANK, device, self._timeout_s)
        with self._lock:
            self._groups[receiver_id] = (key, group)
        return group

    def _push(self, offer, request: pb.DistPullRequest, plan: pb.DistPlan, batch: list[int], heads) -> None:
        """Post every send of a layer at once (runs, then checksum), and let them drain while the next waits."""
        sent, pending = 0, []
        timeout = timedelta(seconds=self._timeout_s)
        try:
            group = self._group(request.receiver_id, plan.group_key, request.device or "cpu")
            for layer in plan.layers:
                self._registry.wait_layer_ready(offer, layer, self._timeout_s, last_block=batch[-1])
                blocks = self._registry.read_blocks(offer, layer, batch, heads)
                # NCCL sends CUDA tensors, Gloo host ones; both send contiguous memory (a head slice is copied)
                blocks = [run.to(request.device or "cpu").contiguous() for run in blocks]
                self._registry.check_unfinished(offer)  # aborted mid-copy: its blocks may be reused; send nothing
                base = plan.tag_base + layer * (len(plan.run_lengths) + 1)
                for index, run in enumerate(blocks):
                    pending.append(group.send([run], RECEIVER_RANK, base + index))
                    sent += run.numel() * run.element_size()
                pending.append(group.send([_checksum(blocks)], RECEIVER_RANK, base + len(blocks)))
            for work in pending:
                work.wait(timeout)
        except Exception as exc:  # the receiver died or stalled: drop the group, keep the offer
            sent = 0
            log.warning("dist push of %s failed: %s", request.pull.transfer_id, exc)
            with self._lock:
                if self._groups.get(request.receiver_id, (None,))[0] == plan.group_key:
                    del self._groups[request.receiver_id]
            _settle(pending, self._timeout_s)  # sends posted before the failure may still read the blocks
        finally:
            self._registry.close_pull(offer, sent)


class DistKVChannel:
    """The receiver's half: asks for a plan over gRPC, then receives each layer over the pair's group."""

    name = "torch_dist"

    def __init__(self, control: GrpcKVChannel):
        self._control = control
        self._receiver_id = uuid.uuid4().hex
        self._groups: dict[str, tuple[str, object]] = {}  # sender address → (group key, group)
        self._making: dict[str, tuple[str, Future]] = {}  # sender address → (group key, the group being made)
        self._pairs: dict[str, threading.Lock] = {}  # sender address → one pull at a time
        self._lock = threading.Lock()

    def pull(
        self, handle, dest_layers, dest_block_ids, block_indices=(), layers=(), stall_timeout_s=5.0, timeout_s=60.0,
        rank=0, heads=None,
    ) -> PullResult:  # fmt: skip
        indices, wanted_layers, heads = check_request(
            handle, dest_layers, dest_block_ids, block_indices, layers, rank, heads
        )
        address = handle.address(rank)
        with self._lock:
            pair = self._pairs.setdefault(address, threading.Lock())
        start, deadline = time.perf_counter(), time.monotonic() + timeout_s
        received, first_bytes_at, position = 0, 0.0, 0
        phases = dict.fromkeys(PHASES, 0.0)
        while position < len(indices):  # a plan per batch: the blocks the prefill has computed so far
            if time.monotonic() > deadline:
                raise TransferTimeout(handle.transfer_id, f"{position} of {len(indices)} blocks in {timeout_s:g} s")
            request = pb.DistPullRequest(
                pull=pb.PullRequest(
                    wire_version=WIRE_VERSION, transfer_id=handle.transfer_id, block_indices=indices[position:],
                    layers=list(layers), first_head=heads.source, num_heads=heads.count,
                ),
                receiver_id=self._receiver_id,
                device=dest_layers[0].device.type,
            )  # fmt: skip
            waited = time.perf_counter()
            if not pair.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TransferTimeout(handle.transfer_id, f"the pair is busy past the pull's {timeout_s:g} s")
            phases["pair"] += time.perf_counter() - waited
            try:
                ids = dest_block_ids[position:]
                wait_s = min(stall_timeout_s, max(0.01, deadline - time.monotonic()))  # the pull's deadline holds
                blocks, nbytes, landed_at = self._pull_batch(
                    handle, rank, heads, request, dest_layers, ids, wait_s, deadline, phases
                )
            finally:
                pair.release()
            received, position = received + nbytes, position + blocks
            first_bytes_at = first_bytes_at or landed_at
        seconds = time.perf_counter() - start
        return PullResult(
            handle.transfer_id, len(indices), len(wanted_layers), received, seconds, first_bytes_at, phases
        )

    def _pull_batch(
        self, handle, rank, heads, request, dest_layers, dest_block_ids, stall_timeout_s, deadline, phases
    ):  # fmt: skip
        """One plan, into the leading ``dest_block_ids``: (blocks, bytes, wall clock when its first layer landed);
        its time added to ``phases``. A group still to be made is waited for until the pull's ``deadline``."""
        device = request.device
        address = handle.address(rank)
        mark = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] += now - mark
            mark = now

        plan = self._control.call(handle, "PullDist", request, stall_timeout_s, rank)
        phase("plan")
        if not 0 < plan.num_blocks <= len(dest_block_ids) or sum(plan.run_lengths) != plan.num_blocks:
            raise TransferIntegrityError(handle.transfer_id, f"a plan of {plan.num_blocks} blocks {plan.run_lengths}")
        dest_block_ids = dest_block_ids[: plan.num_blocks]
        timeout = timedelta(seconds=stall_timeout_s)
        received, landed_at = 0, 0.0
        try:
            group = self._group(handle.transfer_id, address, plan, device, stall_timeout_s, deadline)
            phase("group")
            posted = [
                self._post_layer(group, plan, layer, dest_layers, dest_block_ids, device, heads)
                for layer in plan.layers
            ]
            for layer, (works, landing, checksum, finish) in zip(plan.layers, posted, strict=True):
                for work in works:
                    work.wait(timeout)
                phase("receive")
                if not torch.equal(checksum, _checksum(landing)):
                    raise TransferIntegrityError(handle.transfer_id, f"layer {layer}: checksum mismatch")
                finish()
                phase("land")
                received += sum(part.numel() * part.element_size() for part in landing)
                landed_at = landed_at or time.time()
        except TransferError:
            self._drop(address, plan.group_key)
            raise
        except Exception as exc:  # a timed-out or broken group: rebuilt on next use
            self._drop(address, plan.group_key)
            raise TransferTimeout(handle.transfer_id, f"torch.distributed receive failed: {exc}") from None
        return plan.num_blocks, received, landed_at

    @staticmethod
    def _post_layer(group, plan: pb.DistPlan, layer: int, dest_layers, dest_block_ids, device: str, heads: HeadSlice):
        """Post one layer's receives. Where the destination blocks are adjacent, take every head this
        receiver holds and are one run of memory, bytes land in the cache; else in a buffer copied into them."""
        dest = dest_layers[layer]
        whole = heads.count == dest.shape[1]
        base = plan.tag_base + layer * (len(plan.run_lengths) + 1)
        works, landing, copies, position = [], [], [], 0
        for index, length in enumerate(plan.run_lengths):
            ids = list(dest_block_ids[position : position + length])
            position += length
            in_cache = dest[ids[0] : ids[0] + length] if whole and len(runs(ids)) == 1 else None
            if in_cache is not None and in_cache.is_contiguous():
                buffer = in_cache
            else:
                buffer = torch.empty((length, heads.count, *dest.shape[2:]), dtype=dest.dtype, device=device)
                copies.append((ids, buffer))
            works.append(group.recv([buffer], SENDER_RANK, base + index))
            landing.append(buffer)
        checksum = torch.empty(1, dtype=torch.int64, device=device)
        works.append(group.recv([checksum], SENDER_RANK, base + len(plan.run_lengths)))

        def finish() -> None:
            for ids, buffer in copies:
                land(dest, heads, ids, buffer)

        return works, landing, checksum, finish

    def release(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0, receivers: int = 1):
        return self._control.release(handle, timeout_s, rank, receivers)

    def abort(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0):
        return self._control.abort(handle, timeout_s, rank)

    def renew(self, handle: TransferHandle, timeout_s: float = 5.0, rank: int = 0):
        return self._control.renew(handle, timeout_s, rank)

    def _group(self, transfer_id: str, address: str, plan: pb.DistPlan, device: str, timeout_s: float, deadline: float):
        """The pair's group under the plan's key: known, or made on a thread of its own (its steps under
        ``timeout_s``) and waited for until the pull's ``deadline``, not the stall deadline: on a busy CPU node the
        sender's store thread has answered tens of seconds late, and a late group still spares the decode side the
        prompt's prefill. One left making past its wait finishes or fails there, unwaited; while it does, the
        sender gets no second one (its store is not answering): a plan under a new key fails at once."""
        with self._lock:
            known = self._groups.get(address)
            if known and known[0] == plan.group_key:
                return known[1]
            making = self._making.get(address)
            if making is None or making[0] != plan.group_key:
                if making is not None and not making[1].done():
                    raise TransferTimeout(transfer_id, f"a torch.distributed group with {address} is still being made")
                making = (plan.group_key, Future())
                self._making[address] = making
                threading.Thread(
                    target=self._make_group, args=(making[1], plan, device, timeout_s), daemon=True,
                    name="pdserve-kv-dist-group",
                ).start()  # fmt: skip
        try:
            group = making[1].result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise TransferTimeout(transfer_id, f"no group with {address} made by the pull's deadline") from None
        finally:
            with self._lock:
                if making[1].done() and self._making.get(address) is making:
                    del self._making[address]
        with self._lock:
            self._groups[address] = (plan.group_key, group)
        return group

    @staticmethod
    def _make_group(made: Future, plan: pb.DistPlan, device: str, timeout_s: float) -> None:
        try:
            timeout = timedelta(seconds=timeout_s)
            store = dist.TCPStore(plan.store_host, plan.store_port, is_master=False, timeout=timeout)
            made.set_result(_new_group(store, plan.group_key, RECEIVER_RANK, device, timeout_s))
        except BaseException as exc:  # the waiting pull raises it; nobody left waiting drops it with the future
            made.set_exception(exc)

    def _drop(self, address: str, key: str) -> None:
        with self._lock:
            if self._groups.get(address, (None,))[0] == key:
                del self._groups[address]
