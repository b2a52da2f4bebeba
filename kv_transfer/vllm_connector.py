"""pdserve's vLLM KV connector: hands vLLM's paged blocks to the transfer registry and channels.

vLLM loads it by module path (``kv_connector_module_path``) and runs two
instances: a scheduler-side one (which blocks, when to free) and a worker-side
one (the KV tensors, the bytes). Requests opt in through their
``kv_transfer_params``:

- producer (prefill worker): ``{"pdserve": "produce", "transfer_id": ..., "block_hashes": [hex, ...]}``.
  The request runs with ``max_tokens=1``. Its blocks are offered from the step
  that computes them: a prompt computed in one step is offered before that
  step, each layer readable once saved; a prompt longer than the step's token
  budget grows its offer chunk by chunk (``ExtendSpec``), so the decode side
  pulls the first chunks while later ones run. When it finishes, its blocks stay
  allocated (vLLM's delayed free) under the transfer's lease, and the output's
  ``kv_transfer_params`` carry ``{"pdserve_handle": hex}``. The blocks are freed
  when the receiver releases them, on abort, or when the lease expires. A
  producer preempted mid-prompt loses its blocks to vLLM at once: its offer is
  withdrawn (``drops``) and the decode side recomputes.
- consumer (decode worker): ``{"pdserve": "consume", "handle": hex, "block_hashes": [hex, ...]}``
  (the hashes of this request's prompt: a handle whose blocks differ is refused). vLLM counts
  its local prefix hit first; only the blocks beyond it are pulled, straight
  into blocks vLLM allocated, between steps. A failed or timed-out pull reports
  those blocks as load errors, so vLLM recomputes them: the request completes,
  correctly, either way.

Tensor parallelism: every rank's worker side serves the KV heads it holds
from a KV server of its own; the handle names each prefill rank's address and
heads. Each decode rank pulls exactly the heads it holds, side by side from the
prefill ranks that hold them (``head_pulls``), so the two pools may run
different tensor-parallel sizes. A prefill rank frees its blocks when every
decode rank has released them. Before pulling, each decode rank compares the
handle's KV fingerprint (model, checkpoint digest, dtype, layers, heads, head
block, layout, block-hash scheme) with its own and refuses any difference: the
blocks are recomputed, the cause counted, nothing is landed.

The cluster secret comes from ``PDSERVE_CLUSTER_TOKEN`` (never from vLLM's
config, which vLLM logs). Extra config (``kv_connector_extra_config``):
``host`` (sender bind address, default 127.0.0.1), ``lease_s`` (30),
``stall_timeout_s`` (5: no progress for that long fails a pull; above one
prefill step, as a chunked prompt's pull waits a step per chunk),
``pull_timeout_s`` (600: a whole pull), ``max_chunk_bytes`` (4 MiB), ``backends`` (the
receiver's preference, default ``["torch_dist", "grpc"]``: the first one the
sender also speaks is used), ``hash_scheme`` (set by pdserve), and
``tls_cert_file``/``tls_key_file``/``tls_ca_file`` (TLS for KV: the gRPC
channel only; a sender with TLS does not offer torch_dist, whose Gloo/NCCL
bytes carry none).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
from vllm.v1.request import RequestStatus

from kv_transfer.channel import GrpcKVChannel, KVChannel
from kv_transfer.dist_channel import DistKVChannel
from kv_transfer.errors import TransferError
from kv_transfer.fingerprint import weights_digest
from kv_transfer.grpc_service import KVTransferServer
from kv_transfer.handoff import (
    DEFAULT_LEASE_S,
    DEFAULT_PULL_TIMEOUT_S,
    PULLED_TOKENS_KEY,
    TOKEN_ENV,
    SenderInfo,
    block_digests,
    failure_cause,
    kv_tls,
    transfer_handle,
    usable_handle,
)
from kv_transfer.transfer import (
    DEFAULT_CHUNK_BYTES,
    KVFingerprint,
    TransferHandle,
    TransferRegistry,
    TransferState,
    head_pulls,
    rank_heads,
)

log = logging.getLogger(__name__)

# vLLM types a rank's handshake as its (empty) base class; the handshake itself is vLLM-free (handoff.py).
KVConnectorHandshakeMetadata.register(SenderInfo)
_LOADS_REMEMBERED = 1024  # recent loads whose times ``transfer_times`` answers


@dataclass(frozen=True)
class OfferSpec:
    """A producer's offer, made before the step that computes its first blocks: ``block_ids`` allocated so
    far, one hash per block of the prompt, and ``segment_end``: the blocks whole once this step has run."""

    request_id: str
    transfer_id: str
    block_ids: list[int]
    block_hashes: list[bytes]
    num_tokens: int
    segment_end: int


@dataclass(frozen=True)
class ExtendSpec:
    """The next chunk of a producer's prompt runs this step: blocks allocated for it, and the blocks whole
    once it has run."""

    transfer_id: str
    block_ids: list[int]
    segment_end: int


@dataclass(frozen=True)
class LoadSpec:
    request_id: str
    handle: TransferHandle
    block_indices: list[int]
    dest_block_ids: list[int]


@dataclass
class PdserveConnectorMetadata(KVConnectorMetadata):
    offers: list[OfferSpec] = field(default_factory=list)
    extends: list[ExtendSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)  # offers whose request was aborted (blocks freed after)
    drops: list[tuple[str, str]] = field(default_factory=list)  # (request, transfer) preempted: blocks freed


@dataclass
class _Producing:
    """A producer whose prompt is still being computed, chunk by chunk (scheduler side)."""

    transfer_id: str
    prompt: int  # tokens
    num_block_ids: int  # block ids offered so far


class PdserveConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._secret = os.environ.get(TOKEN_ENV)
        if not self._secret:
            raise ValueError(f"{TOKEN_ENV} must be set: KV transfers need the cluster token")
        self._host = extra.get("host", "127.0.0.1")
        self._lease_s = float(extra.get("lease_s", DEFAULT_LEASE_S))
        self._stall_timeout_s = float(extra.get("stall_timeout_s", 5.0))
        self._pull_timeout_s = float(extra.get("pull_timeout_s", DEFAULT_PULL_TIMEOUT_S))
        self._max_chunk_bytes = int(extra.get("max_chunk_bytes", DEFAULT_CHUNK_BYTES))
        self._preferred = list(extra.get("backends", ["torch_dist", "grpc"]))
        self._hash_scheme = int(extra.get("hash_scheme", 0))
        self._tls = kv_tls(extra)
        self._block_size = vllm_config.cache_config.block_size
        self._layer_names = [name for group in kv_cache_config.kv_cache_groups for name in group.layer_names]
        # scheduler side
        self._senders: list[SenderInfo] = []  # this engine's ranks, in rank order
        self._pending_loads: list[LoadSpec] = []
        self._handles: dict[str, TransferHandle] = {}  # parsed once, until vLLM allocates the blocks
        self._settled: set[str] = set()  # requests whose remote KV is decided: loading, loaded or refused
        self._fresh_producers: list[tuple[Any, list[int]]] = []  # produce requests allocated this step
        self._offered: dict[str, str] = {}  # producer request id → its transfer id
        self._producing: dict[str, _Producing] = {}  # producers whose prompt runs chunk by chunk
        self._dropped: set[str] = set()  # producers preempted after their offer: never offered again
        self._pulled: dict[str, int] = {}  # request id → prompt tokens whose KV it loads from a prefill worker
        self._pending_aborts: list[str] = []
        # worker side
        self._layers: list[torch.Tensor] = []
        self._fingerprint: KVFingerprint | None = None
        self._heads = range(0)  # the model's KV heads this rank holds
        self._receivers = vllm_config.parallel_config.tensor_parallel_size  # ranks that pull for one request
        self._registry: TransferRegistry | None = None
        self._server: KVTransferServer | None = None
        self._channel: GrpcKVChannel | None = None  # control calls (release, abort)
        self._channels: dict[str, KVChannel] = {}
        self._pullers: ThreadPoolExecutor | None = None  # one load per request
        self._rank_pulls: ThreadPoolExecutor | None = None  # a load's pulls, one per sender rank, side by side
        self._lock = threading.Lock()
        self._request_of: dict[str, str] = {}  # transfer id → producer request id, while offered
        # vLLM frees a producer's blocks when told its send is done, and may be told only once it has finished the
        # request (its contract): an offer freed before that waits in ``_freed_requests``, a request finished
        # first in ``_finished_producers``
        self._freed_requests: set[str] = set()
        self._finished_producers: set[str] = set()
        self._done_recving: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._pulls: dict[str, dict[str, float]] = {}  # backend → pulls, failures, bytes, seconds
        self._failures: dict[str, int] = {}  # cause → failed loads
        self._loads: OrderedDict[str, tuple[float, float]] = OrderedDict()  # transfer id → (first bytes, landed)
        self._stepping: list[str] = []  # transfers whose blocks this step computes, layer by layer

    # ----- scheduler side -----------------------------------------------------------------

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        self._senders = [metadata[rank] for rank in sorted(metadata)]

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        rid = request.request_id
        if params.get("pdserve") != "consume" or rid in self._settled:
            return 0, False
        handle = self._handles.get(rid) or self._handle_of(request)
        missing = 0 if handle is None else min(handle.num_tokens, len(request.prompt_token_ids)) - num_computed_tokens
        if missing <= 0:
            self._settled.add(rid)
            return 0, False
        self._handles[rid] = handle
        return missing, True

    def _handle_of(self, request) -> TransferHandle | None:
        """The request's handle, or None (the request prefills locally) when it cannot be used."""
        return usable_handle(
            request.request_id, request.kv_transfer_params, self._vllm_config.model_config.served_model_name
        )

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if (request.kv_transfer_params or {}).get("pdserve") == "produce":
            self._fresh_producers.append((request, blocks.get_block_ids()[0]))
            return
        handle = self._handles.pop(request.request_id, None)
        if handle is None or num_external_tokens <= 0:
            return
        dest = blocks.get_unhashed_block_ids()
        # The local prefix hit ends where the external tokens begin (get_num_new_matched_tokens).
        first = (handle.num_tokens - num_external_tokens) // self._block_size
        indices = list(range(first, handle.num_blocks))
        self._settled.add(request.request_id)
        self._pulled[request.request_id] = num_external_tokens
        self._pending_loads.append(LoadSpec(request.request_id, handle, indices, dest[: len(indices)]))

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        """Offers for producers' first steps, extensions for their later chunks, loads, aborts, and withdrawals
        of offers whose blocks vLLM took back by preempting their request this step (before the step reuses
        them)."""
        meta = PdserveConnectorMetadata(loads=self._pending_loads, aborts=self._pending_aborts)
        self._pending_loads, self._pending_aborts = [], []
        for rid in scheduler_output.preempted_req_ids or ():
            transfer_id = self._offered.pop(rid, None)
            self._producing.pop(rid, None)
            if transfer_id is not None:
                log.warning("request %s was preempted mid-prompt: its KV offer %s is withdrawn", rid, transfer_id)
                meta.drops.append((rid, transfer_id))
                self._dropped.add(rid)
        scheduled = scheduler_output.num_scheduled_tokens
        for request, block_ids in self._fresh_producers:
            rid = request.request_id
            spec = None if rid in self._dropped else self._offer_spec(request, block_ids, scheduled.get(rid, 0))
            if spec is not None:
                meta.offers.append(spec)
                self._offered[rid] = spec.transfer_id
                if spec.segment_end < len(spec.block_hashes):
                    self._producing[rid] = _Producing(spec.transfer_id, spec.num_tokens, len(spec.block_ids))
        self._fresh_producers = []
        cached = scheduler_output.scheduled_cached_reqs
        for index, rid in enumerate(cached.req_ids):
            producing = self._producing.get(rid)
            if producing is not None:
                computed = cached.num_computed_tokens[index] + scheduled.get(rid, 0)
                meta.extends.append(self._extend_spec(producing, cached.new_block_ids[index], computed))
                if computed >= producing.prompt:
                    del self._producing[rid]
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params or {}
        rid = request.request_id
        self._settled.discard(rid)
        self._handles.pop(rid, None)
        if params.get("pdserve") == "consume":  # how much of the prompt's KV came over the wire, for usage
            return False, {PULLED_TOKENS_KEY: self._pulled.pop(rid, 0)}
        self._dropped.discard(rid)
        transfer_id = self._offered.pop(rid, None)
        if transfer_id is None:  # nothing offered: not a producer, or preempted after its offer
            return False, None
        if self._producing.pop(rid, None) is not None or request.status == RequestStatus.FINISHED_ABORTED:
            self._pending_aborts.append(transfer_id)  # a pull may be reading them: freed once the offer is aborted
            return True, None
        num_tokens = request.num_computed_tokens
        handle = self.transfer_handle(params["transfer_id"], params.get("block_hashes", []), num_tokens)
        return True, {"pdserve_handle": handle}

    def _offer_spec(self, request, block_ids: list[int], scheduled: int) -> OfferSpec | None:
        """The offer of a producer vLLM allocated blocks for and runs this step (its whole prompt or a first
        chunk): made before the step, each layer readable once saved, so a decode worker that got the handle up
        front pulls early layers while later ones are computed."""
        if not self._senders:
            log.error("no KV sender registered; request %s is not offered", request.request_id)
            return None
        params = request.kv_transfer_params or {}
        transfer_id = params.get("transfer_id")
        if not isinstance(transfer_id, str) or not transfer_id:
            log.error("request %s asks to produce KV without a transfer_id; not offered", request.request_id)
            return None
        prompt = len(request.prompt_token_ids)
        num_blocks = -(-prompt // self._block_size)
        segment_end = self._segment_end(request.num_computed_tokens + scheduled, prompt)
        hashes = block_digests(params, num_blocks)
        return OfferSpec(request.request_id, transfer_id, block_ids[:num_blocks], hashes, prompt, segment_end)

    def _extend_spec(self, producing: _Producing, new_block_ids, computed: int) -> ExtendSpec:
        """A producer's next chunk: the blocks vLLM allocated for it, and the blocks whole after it."""
        room = -(-producing.prompt // self._block_size) - producing.num_block_ids
        ids = list(new_block_ids[0])[:room] if new_block_ids else []
        producing.num_block_ids += len(ids)
        return ExtendSpec(producing.transfer_id, ids, self._segment_end(computed, producing.prompt))

    def _segment_end(self, computed: int, prompt: int) -> int:
        """Blocks whose KV is whole once ``computed`` of the prompt's tokens are (its last block may be partial)."""
        return -(-prompt // self._block_size) if computed >= prompt else computed // self._block_size

    def transfer_handle(self, transfer_id: str, block_hashes: list[str], num_tokens: int) -> str:
        return transfer_handle(self._senders, self._block_size, transfer_id, block_hashes, num_tokens)

    # ----- worker side --------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Each layer's tensor is vLLM's logical per-layer view, [blocks, KV heads, block tokens, content]."""
        self._layers = [kv_caches[name] for name in self._layer_names]
        self._layer_index = {name: index for index, name in enumerate(self._layer_names)}
        model = self._vllm_config.model_config
        first = self._layers[0]
        self._heads = rank_heads(get_tensor_model_parallel_rank(), self._receivers, model.get_total_num_kv_heads())
        if first.shape[1] != len(self._heads):
            raise ValueError(f"this rank's KV cache holds {first.shape[1]} heads; vLLM's sharding gives {self._heads}")
        self._fingerprint = KVFingerprint(
            model.served_model_name, weights_digest(model.model), str(first.dtype).removeprefix("torch."),
            len(self._layers), model.get_total_num_kv_heads(), tuple(first.shape[2:]),
            self._kv_cache_config.kv_cache_layout or "", self._hash_scheme,
        )  # fmt: skip
        self._registry = TransferRegistry("", "", lease_s=self._lease_s, on_freed=self._freed)
        server_tls = (self._tls.key, self._tls.certificate) if self._tls else None
        self._server = KVTransferServer(
            self._registry, self._secret, self._host, 0, self._stall_timeout_s, tls=server_tls,
            torch_dist="torch_dist" in self._offered_backends(),
        ).start()  # fmt: skip
        self._channel = GrpcKVChannel(self._secret, self._max_chunk_bytes, self._tls.ca if self._tls else None)
        self._channels = {"grpc": self._channel, "torch_dist": DistKVChannel(self._channel)}
        self._pullers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pdserve-kv-load")
        self._rank_pulls = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pdserve-kv-pull")

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._sender_info()

    def _offered_backends(self) -> tuple[str, ...]:
        """Gloo and NCCL carry no TLS: with TLS on, the KV bytes go over gRPC only."""
        return ("grpc",) if self._tls else ("grpc", "torch_dist")

    def _sender_info(self) -> SenderInfo:
        return SenderInfo(
            self._server.address, self._heads.start, len(self._heads), self._fingerprint, self._offered_backends()
        )

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Before the forward (vLLM starts async loads only after it): withdrawals and aborts, then this step's
        offers and chunks, whose layers become readable as the step saves them."""
        super().bind_connector_metadata(connector_metadata)
        for request_id, transfer_id in connector_metadata.drops:
            with self._lock:  # vLLM freed the blocks itself: never report this request's send
                offered = self._request_of.get(transfer_id) == request_id  # not when its offer was refused
                if offered:
                    del self._request_of[transfer_id]
                self._freed_requests.discard(request_id)
                self._finished_producers.discard(request_id)
            if offered and not self._registry.withdraw(transfer_id, self._stall_timeout_s):
                log.error("transfer %s: a pull still reads blocks vLLM took back", transfer_id)
        for transfer_id in connector_metadata.aborts:
            self.abort_transfer(transfer_id)
        offers = [spec.transfer_id for spec in connector_metadata.offers if self._offer(spec)]
        self._stepping = offers + [spec.transfer_id for spec in connector_metadata.extends if self._extend(spec)]

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        for load in self._get_connector_metadata().loads:
            self._pullers.submit(self._load, load)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete between steps (the request waits in WAITING_FOR_REMOTE_KVS)."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        """This layer's KV is in the cache now: early offers may send it while later layers run."""
        if self._stepping:
            layer = self._layer_index[layer_name]
            for transfer_id in self._stepping:
                self._mark_ready(transfer_id, layer)

    def wait_for_save(self) -> None:
        for transfer_id in self._stepping:  # every layer has run, whether or not each reported
            self._mark_ready(transfer_id, len(self._layers) - 1)
        self._stepping = []

    def _mark_ready(self, transfer_id: str, layer: int) -> None:
        try:
            self._registry.mark_layer_ready(transfer_id, layer)
        except TransferError:  # already pulled and released (or aborted): nothing waits for this layer
            pass

    def _offer(self, spec: OfferSpec) -> bool:
        with self._lock:  # mapped first: an abort may free the offer as soon as it exists
            mapped = spec.transfer_id not in self._request_of
            if mapped:
                self._request_of[spec.transfer_id] = spec.request_id
        try:
            self._registry.offer(
                spec.transfer_id, self._layers, spec.block_ids, spec.block_hashes, spec.num_tokens,
                self._kv_cache_config.kv_cache_layout or "", layers_ready=0, segment=spec.segment_end,
            )  # fmt: skip
        except ValueError as exc:  # e.g. a transfer id used twice: free the blocks once vLLM is done with them
            log.error("request %s not offered: %s", spec.request_id, exc)
            with self._lock:
                if mapped:
                    del self._request_of[spec.transfer_id]
                self._freed_requests.add(spec.request_id)
            return False
        return True

    def _extend(self, spec: ExtendSpec) -> bool:
        try:
            self._registry.extend(spec.transfer_id, spec.block_ids, spec.segment_end)
        except TransferError:  # released or aborted already (the decode side gave up): nothing to extend
            return False
        except ValueError as exc:  # blocks that do not add up: fail the transfer closed, the decode side recomputes
            log.error("transfer %s not extended, aborted: %s", spec.transfer_id, exc)
            self.abort_transfer(spec.transfer_id)
            return False
        return True

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            producers = set(self._request_of.values()) | self._freed_requests
            self._finished_producers |= finished_req_ids & producers
            sending = self._freed_requests & self._finished_producers
            self._freed_requests -= sending
            self._finished_producers -= sending
            recving, self._done_recving = self._done_recving, set()
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        for pool in (self._pullers, self._rank_pulls):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self._server is not None:
            self._server.stop()
        if self._registry is not None:
            self._registry.close()
        if self._channel is not None:
            self._channel.close()

    def _load(self, load: LoadSpec) -> None:
        """Pull this rank's heads of the blocks from the sender ranks that hold them, side by side; any failure
        (an incompatible sender included: nothing is read from it) reports the blocks for recompute."""
        handle, channel, cause = load.handle, self._channel_for(load.handle), None
        nbytes, seconds, first_bytes_at, phases = 0, 0.0, 0.0, {}
        try:
            handle.fingerprint.check_compatible(handle.transfer_id, self._fingerprint)
            pull = functools.partial(
                channel.pull, handle, self._layers, load.dest_block_ids, load.block_indices,
                stall_timeout_s=self._stall_timeout_s, timeout_s=self._pull_timeout_s,
            )  # fmt: skip
            pulls = [self._rank_pulls.submit(pull, rank=r, heads=h) for r, h in head_pulls(handle.ranks, self._heads)]
            wait(pulls)  # every pull has let go of the destination blocks before any outcome is reported
            for future in pulls:
                result = future.result()
                if result.seconds >= seconds:  # the load took as long as its slowest rank pull: its phases
                    seconds, phases = result.seconds, result.phases
                nbytes += result.bytes
                first_bytes_at = min(filter(None, (first_bytes_at, result.first_bytes_at)), default=0.0)
        except (TransferError, ValueError) as exc:  # ValueError: the sender's ranks lack heads this one holds
            cause = failure_cause(exc) if isinstance(exc, TransferError) else "incompatible"
            log.warning("KV load failed (%s), recomputing locally: %s", cause, exc)
        except Exception:
            cause = "other"
            log.exception("KV load failed, recomputing locally")
        self._count(channel.name, nbytes, seconds, phases, cause)
        self._remember_load(handle.transfer_id, first_bytes_at)
        self._finish_remote(handle, failed=cause is not None)
        with self._lock:
            if cause is not None:
                self._failed_blocks.update(load.dest_block_ids)
            self._done_recving.add(load.request_id)

    def abort_transfer(self, transfer_id: str) -> None:
        """Free an offer nobody will pull, from this process (no network hop); one not offered yet is
        refused when its prefill ends."""
        try:
            self._registry.abort(transfer_id)
        except TransferError:  # already released or expired
            pass

    def open_transfers(self) -> int:
        """Offers still held for a peer to pull (a producer's; none on a consumer)."""
        return len(self._registry.active()) if self._registry is not None else 0

    def transfer_stats(self) -> dict[str, dict]:
        """For metrics: this rank's pulls per backend (counts, failures, bytes, seconds, and where a channel
        times them ``seconds_by_phase``), its failed loads per cause, and its offers by final state
        (``expired``: leases that ran out)."""
        offers = dict(self._registry.stats().finished) if self._registry is not None else {}
        with self._lock:
            pulls = copy.deepcopy(self._pulls)
            return {"pulls": pulls, "failures": dict(self._failures), "offers": offers}

    def transfer_times(self, transfer_id: str) -> dict[str, float]:
        """When this rank's part of a recent transfer happened, wall clock: as a sender, ``last_step_at`` (the
        step computing the prompt's last chunk began) and ``computed_at`` (its last layer saved); as a receiver,
        ``first_bytes_at`` and ``landed_at``. Absent: not known here (not this rank's side, or too long ago)."""
        times = {}
        if self._registry is not None:
            try:
                status = self._registry.status(transfer_id)
            except TransferError:
                status = None
            if status is not None and status.computed_at:
                times.update(last_step_at=status.last_step_at, computed_at=status.computed_at)
        with self._lock:
            load = self._loads.get(transfer_id)
        if load is not None:
            times.update(first_bytes_at=load[0], landed_at=load[1])
        return times

    def _remember_load(self, transfer_id: str, first_bytes_at: float) -> None:
        with self._lock:
            self._loads[transfer_id] = (first_bytes_at, time.time())
            while len(self._loads) > _LOADS_REMEMBERED:
                self._loads.popitem(last=False)

    def _count(self, backend: str, nbytes: int, seconds: float, phases: dict[str, float], cause: str | None) -> None:
        with self._lock:
            figures = self._pulls.setdefault(backend, {"pulls": 0, "failures": 0, "bytes": 0, "seconds": 0.0})
            figures["pulls"] += 1
            figures["failures"] += int(cause is not None)
            figures["bytes"] += nbytes
            figures["seconds"] += seconds
            if phases:
                by_phase = figures.setdefault("seconds_by_phase", {})
                for phase, phase_seconds in phases.items():
                    by_phase[phase] = by_phase.get(phase, 0.0) + phase_seconds
            if cause is not None:
                self._failures[cause] = self._failures.get(cause, 0) + 1

    def _channel_for(self, handle: TransferHandle) -> KVChannel:
        backend = next((b for b in self._preferred if b in handle.backends and b in self._channels), "grpc")
        return self._channels[backend]

    def _finish_remote(self, handle: TransferHandle, failed: bool) -> None:
        """Tell every sender rank this rank is done: each frees its blocks once all of this engine's ranks are
        (or at once, on a failure); a dead sender frees them by its lease."""
        for rank in range(len(handle.ranks)):
            try:
                if failed:
                    self._channel.abort(handle, self._stall_timeout_s, rank)
                else:
                    self._channel.release(handle, self._stall_timeout_s, rank, self._receivers)
            except TransferError as exc:
                log.info("could not tell sender rank %d to free %s: %s", rank, handle.transfer_id, exc)

    def _freed(self, transfer_id: str, state: TransferState) -> None:
        with self._lock:
            request_id = self._request_of.pop(transfer_id, None)
            if request_id is not None:
                self._freed_requests.add(request_id)
