"""One worker's engine: vLLM's ``LLMEngine`` run in this process, stepped by one thread.

vLLM's async engine always puts the engine core in another process; the
in-process ``LLMEngine`` does not, which starts faster and lets the worker read
the KV pool and scheduler directly. A single loop thread owns the engine:
callers hand it commands (add, abort) through a queue and read their outputs
from per-request asyncio queues, so vLLM is never touched from two threads.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from engine.cache_events import CacheEvent, CacheEventSubscriber, CacheEventTranslator
from engine.config import EngineConfig
from engine.cpu_isa import AmxPermission, request_amx_permission
from engine.errors import EngineConfigError, EngineError, EngineInputError
from engine.types import EngineStats, GenerateRequest, KVLayout, OutputDelta, SamplingOptions
from engine.vllm_args import apply_vllm_environment, vllm_engine_args

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.1
_SETTLE_POLL_S = 0.005


@dataclass
class _Add:
    request: GenerateRequest
    params: object  # vllm.SamplingParams


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[], object]
    done: asyncio.Future


class _Stream:
    """Where the loop thread delivers one request's deltas (or its error)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: deque[OutputDelta | Exception] = deque()
        self._arrived = asyncio.Event()
        self.completion_tokens = 0
        self.cached_counted = False

    def put(self, item: OutputDelta | Exception) -> None:
        """Called on the stream's own event loop."""
        self._items.append(item)
        self._arrived.set()

    async def get(self, timeout_s: float) -> OutputDelta | Exception:
        while not self._items:
            self._arrived.clear()
            async with asyncio.timeout(timeout_s):
                await self._arrived.wait()
        return self._items.popleft()

    def push(self, item: OutputDelta | Exception) -> None:
        """Called from the engine thread."""
        _post(self.loop, [(self, item)])


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, OutputDelta | Exception]]) -> None:
    """Hand items to their streams on the streams' event loop, in one wake-up of that loop."""

    def put_all() -> None:
        for stream, item in items:
            stream.put(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the consumer's loop is gone; nobody is listening
        pass


def _local_address(endpoint: str) -> str:
    """Where a subscriber on this machine connects for a publisher bound to ``endpoint``."""
    return endpoint.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")


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
        apply_vllm_environment(config)
        logging.getLogger("vllm").setLevel(config.log_level)
        _refuse_bfloat16_without_amx(config)
        self._tmp = tempfile.TemporaryDirectory(prefix="pdserve-engine-")
        endpoint = config.kv_events_endpoint
        if endpoint is None and on_cache_events is not None:
            endpoint = f"ipc://{Path(self._tmp.name) / 'kv-events.sock'}"
        self._subscriber = None
        if on_cache_events is not None:
            translator = CacheEventTranslator(self.model_id, config.block_size)
            self._subscriber = CacheEventSubscriber(_local_address(endpoint), translator, on_cache_events)
        self._streams: dict[str, _Stream] = {}
        self._commands: queue.Queue = queue.Queue()
        self._prompt_tokens_total = 0
        self._cached_tokens_total = 0
        self._failure: BaseException | None = None
        self._closing = threading.Event()
        # The loop thread builds the engine too: vLLM binds its OpenMP threads to cores from the
        # thread that builds it, and steps run at full speed only from that same thread.
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(endpoint, built), name="pdserve-engine", daemon=True)
        self._thread.start()
        try:
            self._llm = built.result(timeout=config.start_timeout_s)
            self._await_subscription()
        except BaseException:
            self._closing.set()
            if built.done() and built.exception() is None:  # built, then the subscription failed
                self._thread.join(5)
                built.result().engine_core.shutdown()
            self._close_subscriber()
            self._tmp.cleanup()
            raise
        model_config = self._llm.model_config
        self.block_size = self._llm.vllm_config.cache_config.block_size
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.get_vocab_size()
        self._tokenizer = self._llm.get_tokenizer()

    @staticmethod
    def _build(config: EngineConfig, endpoint: str | None):
        from vllm.v1.engine.llm_engine import LLMEngine

        try:
            return LLMEngine.from_engine_args(vllm_engine_args(config, endpoint))
        except Exception as exc:  # whatever vLLM or transformers raise, the model cannot be served
            raise EngineConfigError("model", f"vLLM could not build an engine for {config.model}: {exc}") from exc

    # ----- the interface the workers call -------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        """Stream ``request``'s deltas; closing the iterator early aborts the request."""
        params = self._validate(request)
        if self._failure is not None:
            raise EngineError(f"engine is down: {self._failure}")
        if request.request_id in self._streams:
            raise EngineInputError("request_id", "a request with this id is already running", request.request_id)
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request.request_id] = stream
        self._commands.put(_Add(request, params))
        finished = False
        try:
            while True:
                try:
                    item = await stream.get(self.config.stall_timeout_s)
                except TimeoutError:
                    raise EngineError(
                        f"request {request.request_id} got no output for {self.config.stall_timeout_s:g} s"
                    ) from None
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._commands.put(_Abort(request.request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def check_alive(self) -> None:
        """Raise ``EngineError`` when the loop thread has failed or stopped."""
        if self._failure is not None:
            raise EngineError(f"engine is down: {self._failure}")
        if not self._thread.is_alive():
            raise EngineError("engine loop stopped")

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)

    def stats(self) -> EngineStats:
        scheduler = self._core.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        return EngineStats(
            # vLLM keeps one block aside as the null block; it is never free or used.
            kv_blocks_total=pool.num_gpu_blocks - 1,
            kv_blocks_free=pool.get_num_free_blocks(),
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            prompt_tokens_total=self._prompt_tokens_total,
            cached_prompt_tokens_total=self._cached_tokens_total,
        )

    def kv_transfer_stats(self) -> dict[str, dict[str, float]]:
        """The KV connector's transfer figures per backend, where the connector keeps them (pdserve's does)."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if not has_kv_transfer_group():
            return {}
        stats = getattr(get_kv_transfer_group(), "transfer_stats", None)
        return stats() if stats is not None else {}

    def kv_transfer_handle(self, transfer_id: str, block_hashes: list[str], num_tokens: int) -> str | None:
        """The connector's handle (hex) for a transfer this engine is about to produce, if it makes them."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        make = getattr(get_kv_transfer_group(), "transfer_handle", None) if has_kv_transfer_group() else None
        return make(transfer_id, block_hashes, num_tokens) if make is not None else None

    def abort_kv_transfer(self, transfer_id: str) -> None:
        """Free a transfer this engine offers (or will offer) that nobody will pull."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        abort = getattr(get_kv_transfer_group(), "abort_transfer", None) if has_kv_transfer_group() else None
        if abort is not None:
            abort(transfer_id)

    def open_kv_transfers(self) -> int:
        """Transfers this engine offers that no peer has finished pulling yet."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        count = getattr(get_kv_transfer_group(), "open_transfers", None) if has_kv_transfer_group() else None
        return count() if count is not None else 0

    def kv_layout(self) -> KVLayout:
        runner = self._core.model_executor.driver_worker.worker.model_runner
        kv_config = self._core.scheduler.kv_cache_config
        first = runner.kv_caches[0]
        return KVLayout(
            device=first.device.type,
            dtype=str(first.dtype).removeprefix("torch."),
            block_size=self.block_size,
            num_blocks=kv_config.num_blocks,
            layer_names=[name for group in kv_config.kv_cache_groups for name in group.layer_names],
            block_shape=tuple(first.shape[1:]),
            cache_layout=kv_config.kv_cache_layout,
        )

    async def reset_prefix_cache(self) -> bool:
        """Drop every cached block not in use (emits ``cleared``); true when it did."""
        future = asyncio.get_running_loop().create_future()
        self._commands.put(_Call(self._reset_prefix_cache_now, future))
        return bool(await asyncio.wait_for(future, self.config.stall_timeout_s))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._closing.set()
        self._thread.join(timeout)
        self._llm.engine_core.shutdown()
        self._close_subscriber()
        self._tmp.cleanup()

    # ----- internals ----------------------------------------------------------------------

    @property
    def _core(self):
        return self._llm.engine_core.engine_core

    def _await_subscription(self, timeout_s: float = 10.0) -> None:
        """Publish empty batches until our subscriber sees one, so no real event is published unheard.

        ZMQ drops what a PUB socket sends before a subscription has reached it.
        """
        if self._subscriber is None:
            return
        from vllm.distributed.kv_events import KVEventBatch

        publisher = self._core.scheduler.kv_event_publisher
        deadline = time.monotonic() + timeout_s
        while not self._subscriber.receiving.wait(0.05):
            if time.monotonic() > deadline:
                raise EngineError(f"no KV event reached the subscriber in {timeout_s:g} s")
            publisher.publish(KVEventBatch(ts=time.time(), events=[]))

    def _reset_prefix_cache_now(self) -> bool:
        reset = self._llm.reset_prefix_cache()
        # vLLM publishes cache events only at the end of a step; an idle engine would sit on
        # the "cleared" event until the next request, leaving the index stale meanwhile.
        scheduler = self._core.scheduler
        pending = scheduler.kv_cache_manager.take_events()
        if pending:
            from vllm.distributed.kv_events import KVEventBatch

            scheduler.kv_event_publisher.publish(KVEventBatch(ts=time.time(), events=pending))
        return reset

    def _validate(self, request: GenerateRequest):
        rid = request.request_id
        ids = request.prompt_token_ids
        if not isinstance(rid, str) or not rid:
            raise EngineInputError("request_id", "must be a non-empty string")
        if not ids:
            raise EngineInputError("prompt_token_ids", "must not be empty", rid)
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise EngineInputError("prompt_token_ids", f"token id {bad!r} is outside [0, {self.vocab_size})", rid)
        total = len(ids) + request.sampling.max_tokens
        if total > self.max_model_len:
            raise EngineInputError(
                "max_tokens",
                f"prompt ({len(ids)} tokens) + max_tokens ({request.sampling.max_tokens}) = {total} "
                f"exceeds the context length {self.max_model_len}",
                rid,
            )
        _check_sampling(request.sampling, rid)
        return self._sampling_params(request.sampling, request.kv_transfer_params, rid)

    @staticmethod
    def _sampling_params(options: SamplingOptions, kv_transfer_params: dict | None, rid: str):
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
                logprobs=options.logprobs,
                presence_penalty=options.presence_penalty,
                frequency_penalty=options.frequency_penalty,
                repetition_penalty=options.repetition_penalty,
                output_kind=RequestOutputKind.DELTA,
                extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None,
            )
        except VLLMValidationError as exc:
            raise EngineInputError(exc.parameter or "sampling", exc.args[0], rid) from exc
        except (ValueError, TypeError) as exc:
            raise EngineInputError("sampling", str(exc), rid) from exc

    def _run(self, endpoint: str | None, built: Future) -> None:
        try:
            self._llm = self._build(self.config, endpoint)
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(self._llm)
        self._loop()

    def _loop(self) -> None:
        try:
            while not self._closing.is_set():
                serving = self._llm.has_unfinished_requests()
                # Finished requests can still hold blocks for a KV connector (a transfer in
                # flight): the engine keeps stepping, gently, until the connector lets go.
                settling = not serving and self._core.scheduler.has_requests()
                self._take_commands(block=not serving and not settling)
                if serving or settling:
                    self._deliver(self._llm.step())
                # Nothing runnable (only transfers in flight, or requests waiting for their KV):
                # step gently so the transfer threads get the cores.
                if settling or (serving and not self._core.scheduler.running):
                    time.sleep(_SETTLE_POLL_S)
        except Exception as exc:  # an engine step failed: every waiting request learns it
            log.exception("engine loop failed")
            self._failure = exc
            for stream in list(self._streams.values()):
                stream.push(EngineError(f"engine failed: {exc}"))

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_command(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run_command(self, command) -> None:
        if isinstance(command, _Add):
            request = command.request
            try:
                self._llm.add_request(
                    request.request_id, {"prompt_token_ids": list(request.prompt_token_ids)}, command.params
                )
            except (ValueError, TypeError) as exc:
                self._push(request.request_id, EngineInputError("prompt", str(exc), request.request_id))
        elif isinstance(command, _Abort):
            self._llm.abort_request([command.request_id])
            stream = self._streams.get(command.request_id)
            if stream is not None:
                stream.push(self._abort_delta(command.request_id, stream))
        else:
            self._resolve(command)

    @staticmethod
    def _resolve(command: _Call) -> None:
        future = command.done
        try:
            result: object = command.fn()
        except Exception as exc:
            result = exc
        setter = future.set_exception if isinstance(result, Exception) else future.set_result
        future.get_loop().call_soon_threadsafe(lambda: future.done() or setter(result))

    def _push(self, request_id: str, item: OutputDelta | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.push(item)

    def _deliver(self, outputs) -> None:
        """One engine step's outputs, posted to each event loop at once (one wake-up per loop per step)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, self._delta(stream, output)))
        for loop, items in by_loop.items():
            _post(loop, items)

    def _delta(self, stream: _Stream, output) -> OutputDelta:
        completion = output.outputs[0]
        prompt_tokens = len(output.prompt_token_ids or ())
        cached = output.num_cached_tokens or 0
        if not stream.cached_counted:
            stream.cached_counted = True
            self._prompt_tokens_total += prompt_tokens
            self._cached_tokens_total += cached
        stream.completion_tokens += len(completion.token_ids)
        return OutputDelta(
            request_id=output.request_id,
            token_ids=list(completion.token_ids),
            text=completion.text,
            finish_reason=completion.finish_reason if output.finished else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=stream.completion_tokens,
            cached_prompt_tokens=cached,
            kv_transfer_params=output.kv_transfer_params,
        )

    @staticmethod
    def _abort_delta(request_id: str, stream: _Stream) -> OutputDelta:
        return OutputDelta(request_id, [], "", "abort", 0, stream.completion_tokens, 0)

    def _close_subscriber(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()
