"""The simulated engine: the worker-facing surface of ``engine.engine.Engine``, with no model behind it.

It keeps what the control plane sees of a vLLM engine: a paged KV pool with a prefix cache keyed by
pdserve's block hashes and the same stored/removed cache events, continuous batching with vLLM's token
budget, sequence cap and preemption, and its load figures. Only the model is replaced: each step takes
the time a hardware profile gives it (``engine/sim/profile.py``), asleep or as CPU time on the engine's
cores (``engine/sim/compute.py``), and output tokens are a seeded
function of the prompt (``engine/sim/tokens.py``). The worker deployments, the router, the index,
placement, autoscaling and drain run on it unchanged; nothing else knows which engine a worker has.

Steps run on a thread of their own; requests come from any event loop and read their deltas there.
Sampling options it does not model (stop strings, penalties, logprobs, structured output, tools) are
refused by name rather than ignored.

With a KV connector in its config it takes part in disaggregation as a vLLM worker does, through the
same ``kv_transfer_params``: a ``produce`` request's prompt blocks are offered as it runs and held until
pulled; a ``consume`` request waits, blocks allocated, for its KV to land, and computes the prompt itself
where the pull fails. The connector (``kv_transfer/sim_connector.py``) is loaded by module path from the
config, as vLLM loads pdserve's: engine/ and kv_transfer/ do not import each other.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cache_events import CacheEvent
from engine.config import EngineConfig
from engine.errors import EngineConfigError, EngineDeadError, EngineInputError
from engine.requests import check_prompt, next_item
from engine.sim.compute import compute_for
from engine.sim.kv_pool import KVPool
from engine.sim.profile import DEFAULT_PROFILE, load_profile
from engine.sim.scheduler import Scheduler, SimSequence, Step
from engine.sim.tokens import Continuation, sampling_salt
from engine.types import EngineStats, GenerateRequest, KVLayout, OutputDelta, SamplingOptions

log = logging.getLogger(__name__)

DEFAULT_BATCHED_TOKENS = 2048  # vLLM's default with chunked prefill on, for online serving
_IDLE_POLL_S = 0.05
_NOT_MODELLED = SamplingOptions()  # the defaults of every option the simulator does not model
_NOT_MODELLED_FIELDS = (
    "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "allowed_token_ids",
    "bad_words", "logprobs", "prompt_logprobs", "structured", "tool_use",
)  # fmt: skip


@dataclass
class _Producer:
    """A prefill whose prompt blocks are offered to a decode worker under ``transfer_id``."""

    transfer_id: str
    block_hashes: list[bytes]
    hashes_hex: list[str]
    offered: int = 0  # blocks offered so far; 0: not yet
    refused: bool = False  # the offer was refused (aborted before it was made): nothing is held


@dataclass
class _Reader:
    """Where one request's deltas go: a queue on its caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    seq: SimSequence

    async def get(self, timeout_s: float) -> OutputDelta | Exception:
        return await asyncio.wait_for(self.queue.get(), timeout_s)

    def push(self, item: OutputDelta | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is gone: nobody is listening
            pass


class SimulatedEngine:
    """Submit token-id prompts, stream their deltas, abort them, read pool figures: as ``Engine`` does."""

    def __init__(self, config: EngineConfig, on_cache_events: Callable[[list[CacheEvent]], None] | None = None):
        if config.model is None:
            raise EngineConfigError("model", "no model directory given")
        self.config = config
        self.model_id = config.served_model_id
        self.profile = load_profile(config.simulated_profile or DEFAULT_PROFILE)
        model_dir = Path(config.model).expanduser()
        hf = json.loads((model_dir / "config.json").read_text())
        self.vocab_size = int(hf["vocab_size"])
        self.max_model_len = config.max_model_len or int(hf.get("max_position_embeddings", 2048))
        self.block_size = config.block_size
        self._eos = hf.get("eos_token_id")
        self._tokenizer = _load_tokenizer(model_dir)
        self._pool = KVPool(config.num_kv_blocks)
        self._scheduler = Scheduler(
            self._pool, self.model_id, config.block_size, config.max_num_seqs,
            config.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS, config.enable_chunked_prefill is not False,
        )  # fmt: skip
        self.step_token_budget = self._scheduler.max_num_batched_tokens
        self._on_cache_events = on_cache_events
        self._kv = None
        if config.kv_connector is not None:  # by module path, as vLLM loads its connector: engine/ and
            spec = config.kv_connector  # kv_transfer/ do not import each other (DESIGN.md)
            connector = getattr(importlib.import_module(spec.module_path), spec.class_name)
            self._kv = connector(
                spec.role,
                spec.extra,
                self.model_id,
                config.num_kv_blocks,
                config.block_size,
                link_s=self.profile.transfer_s,
                on_freed=self._transfer_freed,
            )
        self._producers: dict[str, _Producer] = {}  # request id → its offer
        self._transfer_of: dict[str, str] = {}  # transfer id → the request whose blocks it holds
        self._consumers: dict[str, Any] = {}  # request id → the handle of the KV it pulls
        self._pulled: dict[str, int] = {}  # request id → prompt tokens whose KV landed
        self._readers: dict[str, _Reader] = {}
        self._prompt_tokens_total = self._cached_tokens_total = 0
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stopped = threading.Event()
        try:
            self._compute = compute_for(config)
        except BaseException:
            if self._kv is not None:
                self._kv.close()
            raise
        self._thread = threading.Thread(target=self._run, name="pdserve-sim-engine", daemon=True)
        self._thread.start()

    # ----- the interface the workers call -------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        """Stream ``request``'s deltas; closing the iterator early aborts the request."""
        seq = self._sequence(request)
        part = self._part(seq, request.kv_transfer_params or {})
        if self.profile.request_ms:  # the worker's share of a request outside the steps (engine/sim/profile.py)
            await asyncio.sleep(self.profile.request_s)
        self.check_alive()
        reader = _Reader(asyncio.get_running_loop(), asyncio.Queue(), seq)
        with self._lock:
            if request.request_id in self._readers:
                raise EngineInputError("request_id", "a request with this id is already running", request.request_id)
            self._readers[request.request_id] = reader
            if isinstance(part, _Producer):
                self._producers[seq.request_id] = part
                seq.hold_blocks = True
            elif part is not None:
                self._consumers[seq.request_id] = part
                seq.remote_tokens = min(part.num_tokens, len(seq.prompt))
            self._scheduler.add(seq)
        self._work.set()
        finished = False
        try:
            while not finished:
                item = await next_item(reader.get, request.request_id, self.config.stall_timeout_s)
                if isinstance(item, Exception):  # the request ended with it: nothing left to cancel
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._drop(request.request_id)

    def abort(self, request_id: str) -> None:
        """End a running request: its stream gets a last delta with ``finish_reason="abort"``."""
        reader = self._drop(request_id)
        if reader is not None:
            seq = reader.seq
            reader.push(OutputDelta(request_id, [], "", "abort", len(seq.prompt), len(seq.output), 0))

    def check_alive(self) -> None:
        if self._stopped.is_set():
            raise EngineDeadError("engine is shut down")
        if not self._thread.is_alive():
            raise EngineDeadError("the simulated engine's step thread stopped")

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                kv_blocks_total=self._pool.num_blocks,
                kv_blocks_free=self._pool.free_blocks,
                running=len(self._scheduler.running),
                waiting=len(self._scheduler.waiting) + len(self._scheduler.remote),  # vLLM's: waiting for KV too
                awaiting_kv=len(self._scheduler.remote),
                prompt_tokens_total=self._prompt_tokens_total,
                cached_prompt_tokens_total=self._cached_tokens_total,
            )

    def kv_connector_handshake(self) -> list[dict] | None:
        return self._kv.handshake() if self._kv is not None else None

    def kv_transfer_stats(self) -> dict[str, dict]:
        return self._kv.stats() if self._kv is not None else {}

    def kv_transfer_times(self, transfer_id: str) -> list[dict[str, float]]:
        return []

    async def abort_kv_transfer(self, transfer_id: str) -> None:
        if self._kv is not None:
            self._kv.abort(transfer_id)

    def open_kv_transfers(self) -> int:
        return self._kv.open_transfers() if self._kv is not None else 0

    def kv_layout(self) -> KVLayout:
        return KVLayout("simulated", "none", self.block_size, self._pool.num_blocks)

    async def reset_prefix_cache(self) -> bool:
        with self._lock:
            reset = self._pool.reset()
            events = self._pool.take_events()
        self._announce(events)
        return reset

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._work.set()
        self._thread.join(timeout)
        self._compute.close()
        if self._kv is not None:
            self._kv.close()
        with self._lock:
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.push(EngineDeadError("engine is shut down"))

    # ----- internals ----------------------------------------------------------------------

    def _sequence(self, request: GenerateRequest) -> SimSequence:
        rid, ids, options = request.request_id, request.prompt_token_ids, request.sampling
        check_prompt(request, self.vocab_size, self.max_model_len)
        if options.max_tokens < 1:
            raise EngineInputError("max_tokens", f"must be at least 1, got {options.max_tokens}", rid)
        for name in _NOT_MODELLED_FIELDS:
            if getattr(options, name) != getattr(_NOT_MODELLED, name):
                raise EngineInputError(name, "the simulated engine does not model it", rid)
        continuation = Continuation(ids, sampling_salt(options), self.vocab_size)
        stops = frozenset(options.stop_token_ids) | (
            frozenset() if options.ignore_eos or self._eos is None else frozenset(_as_list(self._eos))
        )
        seq = SimSequence(
            rid, list(ids), options.max_tokens,
            sample=continuation.next_token,
            min_tokens=options.min_tokens, stop_token_ids=stops,
        )  # fmt: skip
        return seq

    def _part(self, seq: SimSequence, params: dict) -> _Producer | Any | None:
        """A ``produce`` request's offer (its blocks held for a puller), a ``consume`` request's handle (an
        unusable one: None, the prompt computed here, as vLLM's connector does), or None."""
        role = params.get("pdserve")
        if role is None:
            return None
        if self._kv is None or role not in ("produce", "consume"):
            raise EngineInputError("kv_transfer_params", f"this engine takes no {role!r} transfer", seq.request_id)
        blocks = -(-len(seq.prompt) // self.block_size)
        hashes_hex = list(params.get("block_hashes") or [])
        if role == "consume":
            return self._kv.usable_handle(seq.request_id, params, self.model_id)
        try:
            hashes = [bytes.fromhex(h) for h in hashes_hex[:blocks]]
        except (TypeError, ValueError):
            raise EngineInputError("kv_transfer_params", "block_hashes must be hex digests", seq.request_id) from None
        hashes += [b""] * (blocks - len(hashes))  # a trailing partial block has none
        return _Producer(params["transfer_id"], hashes, hashes_hex)

    def _drop(self, request_id: str) -> _Reader | None:
        with self._lock:
            reader = self._readers.pop(request_id, None)
            if reader is not None:
                self._scheduler.remove(request_id)
                self._consumers.pop(request_id, None)
                self._pulled.pop(request_id, None)
                producer = self._producers.pop(request_id, None)
                events = self._pool.take_events()
            else:
                producer, events = None, []
        if producer is not None and self._kv is not None:
            self._kv.abort(producer.transfer_id)  # its blocks are gone: a pull reading them fails
        self._announce(events)
        return reader

    def _transfer_freed(self, transfer_id: str) -> None:
        """The registry let go of an offer (pulled, aborted, expired): its blocks go back to the pool; a prefill
        still running or waiting (preempted) keeps them until it ends."""
        with self._lock:
            request_id = self._transfer_of.pop(transfer_id, None)
            if request_id is None:
                return
            if request_id in self._scheduler.held:
                self._scheduler.remove(request_id)
            else:
                queued = (*self._scheduler.running, *self._scheduler.waiting)
                seq = next((s for s in queued if s.request_id == request_id), None)
                if seq is not None:
                    seq.hold_blocks = False
            events = self._pool.take_events()
        self._announce(events)

    def _offer_what_runs(self, step: Step) -> tuple[list[str], list[str]]:
        """Under the lock, before ``step`` runs: offer (or extend) the blocks producers compute in it. The
        transfers whose blocks it computes, and those of producers it preempted, to withdraw."""
        computing, withdrawn = [], []
        for request_id in step.preempted:  # its blocks are gone: whatever was offered is withdrawn
            producer = self._producers.get(request_id)
            if producer is not None and producer.offered and not producer.refused:
                withdrawn.append(producer.transfer_id)
                producer.refused = True
        for seq in self._scheduler.running:
            producer = self._producers.get(seq.request_id)
            tokens = step.scheduled.get(seq.request_id)
            if producer is None or producer.refused or tokens is None:
                continue
            segment_end = min(-(-(seq.computed + tokens) // self.block_size), len(producer.block_hashes))
            if not producer.offered:
                if not self._kv.offer(producer.transfer_id, list(seq.blocks), producer.block_hashes,
                                      len(seq.prompt), segment_end):  # fmt: skip
                    producer.refused, seq.hold_blocks = True, False
                    continue
                self._transfer_of[producer.transfer_id] = seq.request_id
            else:
                self._kv.extend(producer.transfer_id, list(seq.blocks[producer.offered :]), segment_end)
            producer.offered = len(seq.blocks)
            computing.append(producer.transfer_id)
        return computing, withdrawn

    def _start_pulls(self) -> None:
        """Under the lock: pull the KV of the consumers just admitted (blocks allocated), past their prefix hit."""
        for request_id, seq in list(self._scheduler.remote.items()):
            handle = self._consumers.pop(request_id, None)
            if handle is None:
                continue
            first, last = seq.cached_blocks, -(-seq.remote_tokens // self.block_size)
            if first >= last:  # the prefix cache had it all
                self._pulled[request_id] = 0
                self._scheduler.remote_landed(request_id, True)
                continue
            landed = functools.partial(self._landed, request_id, min(seq.remote_tokens, len(seq.prompt) - 1))
            self._kv.pull(handle, list(range(first, last)), seq.blocks[first:last], landed)

    def _landed(self, request_id: str, tokens: int, ok: bool) -> None:
        with self._lock:
            seq = self._scheduler.remote.get(request_id)
            if ok and seq is not None:
                self._pulled[request_id] = tokens - seq.cached_prompt_tokens
            self._scheduler.remote_landed(request_id, ok)
            events = self._pool.take_events()
        self._announce(events)
        self._work.set()

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                with self._lock:
                    step = self._scheduler.schedule()
                    computing, withdrawn = [], []
                    if step is not None and self._kv is not None:
                        computing, withdrawn = self._offer_what_runs(step)
                    if self._kv is not None:
                        self._start_pulls()
                for transfer_id in withdrawn:  # outside the lock: the registry frees them through _transfer_freed
                    self._kv.abort(transfer_id)
                if step is None or not step.scheduled:
                    self._work.wait(_IDLE_POLL_S)
                    self._work.clear()
                    continue
                self._compute.spend(
                    self.profile.step_s(
                        step.prefill_tokens, step.decode_seqs, step.context_tokens, step.prefill_context_pairs
                    )
                )
                for transfer_id in computing:
                    self._kv.computed(transfer_id)
                with self._lock:
                    deltas = [self._delta(seq) for seq in self._scheduler.complete(step)]
                    events = self._pool.take_events()
                self._announce(events)
                for reader, delta in deltas:
                    if reader is not None:
                        reader.push(delta)
        except Exception:  # a bug here must not leave callers waiting: they see a dead engine
            log.exception("the simulated engine's step loop failed")
            self._stopped.set()
            with self._lock:
                readers = list(self._readers.values())
            for reader in readers:
                reader.push(EngineDeadError("the simulated engine's step loop failed"))

    def _delta(self, seq: SimSequence) -> tuple[_Reader | None, OutputDelta]:
        """Under the lock: the delta of the token ``seq`` just got, ending it where it stops."""
        token, produced = seq.tokens[-1], len(seq.output)
        reason = None
        if token in seq.stop_token_ids and produced >= seq.min_tokens:
            reason = "stop"
        elif produced >= seq.max_tokens or len(seq.tokens) >= self.max_model_len:
            reason = "length"
        first = produced == 1
        if first:
            self._prompt_tokens_total += len(seq.prompt)
            self._cached_tokens_total += seq.cached_prompt_tokens
        pulled = self._pulled.get(seq.request_id, 0)
        params = None
        if reason is not None:
            self._scheduler.finish(seq, reason)
            params = self._finished_transfer(seq)
        reader = self._readers.get(seq.request_id)
        if reason is not None:
            self._readers.pop(seq.request_id, None)
        text = self._tokenizer.decode([token])
        delta = OutputDelta(
            seq.request_id, [token], text, reason, len(seq.prompt), produced, seq.cached_prompt_tokens + pulled,
            kv_transfer_params=params, stop_reason=token if reason == "stop" else None,
        )  # fmt: skip
        return reader, delta

    def _finished_transfer(self, seq: SimSequence) -> dict | None:
        """A finished request's ``kv_transfer_params``, as vLLM's connector gives them: a producer's handle
        (None where nothing is held for a puller), a consumer's tokens pulled."""
        rid = seq.request_id
        if rid in self._pulled or rid in self._consumers:
            self._consumers.pop(rid, None)
            return self._kv.pulled_params(self._pulled.pop(rid, 0))
        producer = self._producers.pop(rid, None)
        if producer is None or producer.refused or producer.transfer_id not in self._transfer_of:
            return None
        return self._kv.offered_params(producer.transfer_id, producer.hashes_hex, len(seq.prompt))

    def _announce(self, events: list[CacheEvent]) -> None:
        if events and self._on_cache_events is not None:
            self._on_cache_events(events)


def _as_list(value) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise EngineConfigError("model", f"{model_dir} has no tokenizer.json (the simulated engine reads only that)")
    return Tokenizer.from_file(str(path))
