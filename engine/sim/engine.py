"""The simulated engine: the worker-facing surface of ``engine.engine.Engine``, with no model behind it.

It keeps what the control plane sees of a vLLM engine: a paged KV pool with a prefix cache keyed by
pdserve's block hashes and the same stored/removed cache events, continuous batching with vLLM's token
budget, sequence cap and preemption, and its load figures. Only the model is replaced: each step sleeps
for the time a hardware profile gives it (``engine/sim/profile.py``), and output tokens are a seeded
function of the prompt (``engine/sim/tokens.py``). The worker deployments, the router, the index,
placement, autoscaling and drain run on it unchanged; nothing else knows which engine a worker has.

Steps run on a thread of their own; requests come from any event loop and read their deltas there.
Sampling options it does not model (stop strings, penalties, logprobs, structured output, tools) are
refused by name rather than ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from engine.cache_events import CacheEvent
from engine.config import EngineConfig
from engine.errors import EngineConfigError, EngineDeadError, EngineInputError
from engine.requests import check_prompt, next_delta
from engine.sim.kv_pool import KVPool
from engine.sim.profile import DEFAULT_PROFILE, load_profile
from engine.sim.scheduler import Scheduler, SimSequence
from engine.sim.tokens import output_token, prompt_key, sampling_salt
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
        self._on_cache_events = on_cache_events
        self._readers: dict[str, _Reader] = {}
        self._prompt_tokens_total = self._cached_tokens_total = 0
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-sim-engine", daemon=True)
        self._thread.start()

    # ----- the interface the workers call -------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        """Stream ``request``'s deltas; closing the iterator early aborts the request."""
        seq = self._sequence(request)
        self.check_alive()
        reader = _Reader(asyncio.get_running_loop(), asyncio.Queue(), seq)
        with self._lock:
            if request.request_id in self._readers:
                raise EngineInputError("request_id", "a request with this id is already running", request.request_id)
            self._readers[request.request_id] = reader
            self._scheduler.add(seq)
        self._work.set()
        finished = False
        try:
            while not finished:
                delta = await next_delta(reader.get, request.request_id, self.config.stall_timeout_s)
                finished = delta.finished
                yield delta
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
                running=len(self._scheduler.running) + len(self._scheduler.remote),
                waiting=len(self._scheduler.waiting),
                prompt_tokens_total=self._prompt_tokens_total,
                cached_prompt_tokens_total=self._cached_tokens_total,
            )

    def kv_connector_handshake(self) -> list[dict] | None:
        return None

    def kv_transfer_stats(self) -> dict[str, dict]:
        return {}

    def kv_transfer_times(self, transfer_id: str) -> list[dict[str, float]]:
        return []

    async def abort_kv_transfer(self, transfer_id: str) -> None:
        return None

    def open_kv_transfers(self) -> int:
        return 0

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
        if request.kv_transfer_params:
            raise EngineInputError("kv_transfer_params", "the simulated engine runs colocated only", rid)
        key = prompt_key(ids)
        salt = sampling_salt(options)
        stops = frozenset(options.stop_token_ids) | (
            frozenset() if options.ignore_eos or self._eos is None else frozenset(_as_list(self._eos))
        )
        return SimSequence(
            rid, list(ids), options.max_tokens,
            sample=lambda seq, position: output_token(key, position, salt, self.vocab_size),
            min_tokens=options.min_tokens, stop_token_ids=stops,
        )  # fmt: skip

    def _drop(self, request_id: str) -> _Reader | None:
        with self._lock:
            reader = self._readers.pop(request_id, None)
            if reader is not None:
                self._scheduler.remove(request_id)
                events = self._pool.take_events()
            else:
                events = []
        self._announce(events)
        return reader

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                with self._lock:
                    step = self._scheduler.schedule()
                if step is None:
                    self._work.wait(_IDLE_POLL_S)
                    self._work.clear()
                    continue
                time.sleep(self.profile.step_s(step.prefill_tokens, step.decode_seqs, step.context_tokens))
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
        if reason is not None:
            self._scheduler.finish(seq, reason)
        reader = self._readers.get(seq.request_id)
        if reason is not None:
            self._readers.pop(seq.request_id, None)
        text = self._tokenizer.decode([token])
        delta = OutputDelta(seq.request_id, [token], text, reason, len(seq.prompt), produced, seq.cached_prompt_tokens,
                            stop_reason=token if reason == "stop" else None)  # fmt: skip
        return reader, delta

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
