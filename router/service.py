"""The request path, front-end neutral: validate, tokenize, hash, place, prefill, decode, release.

Both front ends (gRPC, HTTP) call ``GenerationService``; the worker pools sit
behind ``WorkerPools`` (Serve handles in the app). Placement comes from the
router core over the prefix index. A prefill that fails or times out is not
fatal: the decode worker prefills locally. A request that ends before its
decode worker took the KV (cancelled, failed) aborts the transfer, so the
prefill worker frees the blocks at once instead of at lease expiry.

Every placement is reserved in the prefix index (a claim on each chosen
worker) until that worker is done with the request, so every router sharing
the index sees it at once; the service renews its claims while they run, and a
router that dies leaves claims that lapse after ``in_flight_ttl_s``. Request
ids are held the same way in the request registry, so a running id is refused
and an abort is carried out whichever router replica gets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from engine.block_hash import hash_chain
from engine.types import (
    DecodeJob,
    GenerateRequest,
    OutputDelta,
    PrefillJob,
    PrefillResult,
    SamplingOptions,
    TokenLogprob,
    ToolCallDelta,
)
from router.config import RouterConfig
from router.index import Claim, PrefixIndex
from router.metrics import RouterMetrics
from router.placement import NoWorkerError, Placement, Placer
from router.prefill_queue import PrefillQueue
from router.request import (
    DuplicateRequestError,
    GenerationRequest,
    Kind,
    RequestLimits,
    UnknownModelError,
    fit_to_context,
    parse_request,
    tokenize,
)
from router.request_registry import LocalRegistry, RequestRegistry
from router.tokenizer import ModelTokenizer
from router.worker_losses import WorkerLosses

log = logging.getLogger(__name__)

Mode = Literal["disaggregated", "colocated"]
_WORKER_POLL_S = 0.25  # how often a request waiting for a live decode worker looks again
_DEATHS_ALLOWED = 1  # worker deaths charged to one request that it survives (retried once); the next fails it
_PREFILL_HIT_WAIT_S = 1.0  # a decode done before its prefill's end arrived waits this long for the prefill's hit


class ServiceFullError(RuntimeError):
    """Too many requests in flight: maps to gRPC RESOURCE_EXHAUSTED / HTTP 429."""


class WorkerPools(Protocol):
    def prefill(self, worker_id: str, job: PrefillJob) -> AsyncIterator[PrefillResult]:
        """The handle up front (``finished`` false) where the prompt starts at once, then the outcome; else the
        outcome alone, with the handle."""

    def decode(self, worker_id: str, job: DecodeJob) -> AsyncIterator[OutputDelta]:
        """The decode stream; closing it early cancels the request on the worker."""

    async def abort_transfer(self, worker_id: str, transfer_id: str, timeout_s: float) -> None:
        """Free a transfer nobody will take, offered or not yet (then it is refused when offered)."""

    async def transfer_stats(self, role: str, worker_id: str, timeout_s: float) -> dict[str, dict]:
        """A worker's KV transfer figures: pulls per backend, failed loads per cause, offers by final state."""


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_dir: str
    block_size: int
    context_length: int
    vocab_size: int
    tool_call_parser: str | None = None  # the workers read free-text tool calls in this format (vLLM's name)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # found in a prefix cache: the decode worker's own, or the prefill worker's
    kv_transferred_tokens: int = 0  # computed for this request by the prefill worker and moved, not cached


@dataclass(frozen=True)
class Timing:
    ttft_s: float
    e2e_s: float
    placement: str
    prefill_worker: str
    decode_worker: str
    router: str
    migrations: int = 0  # decode workers lost mid-stream, the request carried on elsewhere
    ttft_parts: dict[str, float] = field(default_factory=dict)  # pdserve:time_to_first_token_part_seconds's


@dataclass(frozen=True)
class Chunk:
    """One step of one request's stream; the last has ``finish_reason``, ``usage`` and ``timing``."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    stop_reason: int | str | None = None  # the stop token id or string that ended it
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when asked for
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on the first chunk, when asked for
    tool_calls: tuple[ToolCallDelta, ...] = ()  # a chat with tools: the tool-call pieces of this step


class WorkerGoneError(RuntimeError):
    """The worker's process is gone (died, killed, unreachable) or leaving: not the request's fault."""

    def __init__(self, worker_id: str, reason: str):
        self.worker_id = worker_id
        self.reason = reason
        super().__init__(f"worker {worker_id} is gone: {reason}")


class WorkerLeavingError(WorkerGoneError):
    """The worker is draining (Serve is stopping the replica): its streams move on, nobody died."""


class PoisonRequestError(RuntimeError):
    """Two workers died computing this request: it is not tried on a third (HTTP 500 / gRPC INTERNAL)."""

    def __init__(self, request_id: str, deaths: list[str]):
        self.request_id = request_id
        self.deaths = deaths
        super().__init__(
            f"request {request_id} failed: the workers computing it died {len(deaths)} times "
            f"({'; '.join(deaths)}); it is not tried again"
        )


@dataclass
class _Progress:
    """One request's decode so far, across the decode workers it has run on."""

    start: float
    placement: Placement
    handle: str | None
    transfer_id: str
    placed_at: float  # the parts of the time to the first token: admitted (start), placed, decode worker asked
    asked_at: float = 0.0
    decode_worker: str = ""
    token_ids: list[int] = field(default_factory=list)  # every token the client has been sent
    first_at: float | None = None
    last_at: float = 0.0
    taken: bool = False  # a decode worker answered, so it took the KV
    finished: bool = False
    migrations: int = 0
    resumed_after: int = 0  # tokens streamed before the last migration (part of the resumed prompt)
    streamed_here: bool = False  # the current decode worker has streamed a token (it got past the prompt)
    gone: set[str] = field(default_factory=set)
    move: asyncio.Event = field(default_factory=asyncio.Event)  # set: leave a draining decode worker now
    prefill_hit: asyncio.Future | None = None  # the prefill worker's own prefix hit, once its prefill ends
    ttft_parts: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.decode_worker = self.decode_worker or self.placement.decode_worker


class GenerationService:
    def __init__(
        self,
        model: ModelInfo,
        config: RouterConfig,
        index: PrefixIndex,
        pools: WorkerPools,
        mode: Mode = "disaggregated",
        max_inflight: int = 256,
        prefill_timeout_s: float = 60.0,
        router_id: str = "",
        registry: RequestRegistry | None = None,
    ):
        self.model = model
        self.router_id = router_id
        self._registry = registry or LocalRegistry()
        self.mode = mode
        self.config = config
        self.index = index
        self.limits: RequestLimits = config.limits.for_model(
            model.context_length, model.vocab_size, auto_tool_choice=model.tool_call_parser is not None
        )
        self.tokenizer = ModelTokenizer(model.model_dir)
        self.metrics = RouterMetrics(model.model_id, index.health)
        self._pools = pools
        self._placer = Placer(index, config.placement, model.model_id, model.block_size)
        self.prefill_queue = PrefillQueue(on_change=self._held_for_prefill)
        self._max_inflight = max_inflight
        self._prefill_timeout_s = prefill_timeout_s
        self._running: dict[str, asyncio.Event] = {}  # request id → set to abort it
        self._claims: dict[str, dict[str, Claim]] = {}  # request id → worker id → its reservation in the index
        self._claim_ttl_s = config.index.in_flight_ttl_s
        self._renewing: asyncio.Task | None = None
        self._streams: dict[str, _Progress] = {}  # request id → its decode so far, while it streams
        self._drain_watch: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._deaths: dict[str, list[str]] = {}  # request id → the worker deaths charged to it
        self._first_tokens: dict[str, asyncio.Future] = {}  # request id → its decode worker, once a token streamed
        self.losses = WorkerLosses()
        self.prompt_tokens_total = 0
        self.prefix_hit_tokens_total = 0

    def parse(self, body: bytes | dict, kind: Kind) -> tuple[GenerationRequest, list[int]]:
        """A validated request and its prompt's token ids; ``RequestError`` names the bad field."""
        request = parse_request(body, kind, self.limits)
        self.check_model(request.model)
        if request.request_id in self._running:
            raise DuplicateRequestError("request_id", f"a request with id {request.request_id!r} is already running")
        ids = tokenize(request, self.tokenizer, self.limits)
        return fit_to_context(request, len(ids), self.limits), ids

    def check_model(self, name: str | None) -> None:
        """A request may leave the model out; one that names it names the one served."""
        if name not in (None, "", self.model.model_id):
            raise UnknownModelError("model", f"unknown model {name!r} (served: {self.model.model_id!r})")

    async def generate(
        self,
        request: GenerationRequest,
        token_ids: list[int],
        shares_prompt_with: str | None = None,
        on_admitted: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Stream the completion; closing the iterator (client gone, deadline) cancels it everywhere.

        ``shares_prompt_with``: a running request with the same prompt (an earlier copy of ``n``). This one
        waits for that one's first token and decodes where it does, from the prompt's KV already there: one
        prefill for every copy, as vLLM's parallel sampling shares the prompt's blocks.
        ``on_admitted``: awaited once the request runs here (``abort`` finds it), before it is placed."""
        if len(self._running) >= self._max_inflight:
            raise ServiceFullError(f"{len(self._running)} requests in flight (limit {self._max_inflight})")
        rid = request.request_id
        duplicate = DuplicateRequestError("request_id", f"a request with id {rid!r} is already running")
        if rid in self._running or rid in self._first_tokens:
            raise duplicate
        # before the first await: a copy started after this one (in the same loop turn) finds it
        first_token = self._first_tokens[rid] = asyncio.get_running_loop().create_future()
        try:
            claimed = await _call(self._registry, "claim", rid)
        except BaseException:  # cancelled, or the registry failed: nothing of this request stays
            self._first_tokens.pop(rid).set_result(None)
            raise
        if not claimed:
            self._first_tokens.pop(rid).set_result(None)
            raise duplicate
        aborted = self._running[rid] = asyncio.Event()
        self._deaths[rid] = []
        self.metrics.running.inc()
        start = time.perf_counter()
        outcome = "error"
        try:
            if on_admitted is not None:
                await on_admitted()
            chain = hash_chain(self.model.model_id, token_ids, self.model.block_size)
            placing = self._place(rid, len(token_ids), chain, request.sampling, shares_prompt_with)
            placement = await _unless_aborted(placing, aborted)  # held for prefill room, or waiting for a worker
            placed_at = time.perf_counter()
            if placement is None:
                outcome = "abort"
                yield Chunk(rid, [], "", "abort")
                return
            engine_request = GenerateRequest(rid, token_ids, request.sampling)
            hashes = [digest.hex() for digest in chain]
            async for chunk in self._run(engine_request, placement, hashes, start, placed_at, aborted):
                yield chunk
                if chunk.finish_reason is not None:
                    outcome = chunk.finish_reason
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            self._release(rid)
            self._deaths.pop(rid, None)
            self._first_tokens.pop(rid, None)
            if not first_token.done():
                first_token.set_result(None)
            self._in_background(_call(self._registry, "release", rid))
            self._running.pop(rid, None)
            self.metrics.running.dec()
            self.metrics.requests.labels(outcome).inc()
            self.metrics.e2e.observe(time.perf_counter() - start)

    async def abort(self, request_id: str) -> bool:
        """End a running request, here or on the router replica running it: its stream closes with
        ``finish_reason="abort"`` and its KV is freed."""
        return self.abort_local(request_id) or await _call(self._registry, "abort_elsewhere", request_id)

    def abort_local(self, request_id: str) -> bool:
        aborted = self._running.get(request_id)
        if aborted is not None:
            aborted.set()
        return aborted is not None

    async def render_metrics(self) -> bytes:
        """Prometheus text: the router's own metrics and, read now, every live worker's KV transfer figures."""
        live = await self.live_workers()
        workers = [w for w in live if self.mode == "disaggregated"]
        answers = await asyncio.gather(
            *(self._pools.transfer_stats(w.role, w.worker_id, 1.0) for w in workers), return_exceptions=True
        )
        transfers = {w.worker_id: a for w, a in zip(workers, answers, strict=True) if isinstance(a, dict)}
        return self.metrics.render(live, transfers)

    def running(self) -> int:
        return len(self._running)

    async def pool_health(self) -> dict[str, dict]:
        """Per pool: live workers, and the deaths no replacement has made good yet (a degraded pool)."""
        live = await self.live_workers()
        losses = self.losses.unreplaced(live)
        now = time.monotonic()
        return {
            role: {
                "live": sum(w.role == role for w in live),
                "degraded": [loss.describe(now) for loss in losses if loss.pool == role],
            }
            for role in ("prefill", "decode")
        }

    async def _place(
        self,
        request_id: str,
        prompt_tokens: int,
        chain: list[bytes],
        sampling: SamplingOptions,
        shares_prompt_with: str | None = None,
    ) -> Placement:
        if shares_prompt_with is not None:
            placement = await self._beside(shares_prompt_with, prompt_tokens, chain)
            if placement is not None:
                return await self._reserve(request_id, prompt_tokens, placement)
        # Prompt logprobs come from computing the prompt where it decodes: no KV moved in, no prefix-cache hit.
        decode_only = self.mode == "colocated" or sampling.prompt_logprobs is not None
        async with self._prefill_room(prompt_tokens, chain, decode_only):
            placement = await self._place_when_live(request_id, prompt_tokens, chain, decode_only=decode_only)
            return await self._reserve(request_id, prompt_tokens, placement)

    @contextlib.asynccontextmanager
    async def _prefill_room(self, prompt_tokens: int, chain: list[bytes], decode_only: bool):
        """Held in the router's prefill queue (``router/prefill_queue.py``) while every prefill worker has
        ``placement.prefill_dispatch_limit_tokens`` placed on it; entered at once when the limit is unset or
        room is there and nobody is held before this prompt."""
        limit = self.config.placement.prefill_dispatch_limit_tokens
        queue = self.prefill_queue

        async def still_full() -> bool:
            live, cached = await self._match(chain)
            return self._placer.holds_for_prefill_room(prompt_tokens, self._staying(live), cached, queue.tokens)

        if decode_only or limit is None or (not queue.requests and not await still_full()):
            yield
            return
        async with queue.turn(prompt_tokens, still_full, self.config.placement.prefill_hold_max_s) as room:
            if not room:
                self.metrics.prefill_hold_timeouts.inc()
            yield

    def _held_for_prefill(self, requests: int, tokens: int) -> None:
        self.metrics.prefill_queue_requests.set(requests)
        self.metrics.prefill_queue_tokens.set(tokens)

    async def _reserve(self, request_id: str, prompt_tokens: int, placement: Placement) -> Placement:
        """Claim the placement's workers in the index, so every router sees it at once."""
        self.metrics.placements.labels(placement.outcome, placement.reason).inc()
        lacking = prompt_tokens - placement.decode_cached_tokens  # the KV the decode worker takes on
        if placement.prefill_worker is None:  # the decode worker computes the uncached part itself
            claims = [Claim(request_id, placement.decode_worker, lacking, kv_tokens=lacking)]
        else:
            claims = [Claim(request_id, placement.prefill_worker, prompt_tokens - placement.prefill_cached_tokens),
                      Claim(request_id, placement.decode_worker, kv_tokens=lacking)]  # fmt: skip
        self._claims[request_id] = {c.worker_id: c for c in claims}
        self._renew_claims()
        await _call(self.index, "reserve", claims, self._claim_ttl_s)
        return placement

    async def _beside(self, request_id: str, prompt_tokens: int, chain: list[bytes]) -> Placement | None:
        """On the decode worker of ``request_id`` once it has streamed a token (its prompt's KV is then in that
        worker's prefix cache); None where it ended first, failed, or its worker is no longer live."""
        first_token = self._first_tokens.get(request_id)
        if first_token is None:
            return None
        try:
            holder = await asyncio.wait_for(asyncio.shield(first_token), self._prefill_timeout_s)
        except TimeoutError:
            return None
        live, cached = await _call(self.index, "match", chain)
        if holder is None or not any(w.worker_id == holder for w in self._staying(live)):
            return None
        hit = min(cached.get(holder, 0) * self.model.block_size, prompt_tokens - 1)
        return Placement(None, holder, 0, hit, "local_prefill", "shared_prompt")

    async def _place_when_live(
        self, rid: str, prompt_tokens: int, chain: list[bytes], decode_only: bool, gone: frozenset[str] = frozenset()
    ) -> Placement:
        """Place now; with no live decode worker (the pool's replica died, Serve is starting another), wait
        for one, up to ``recovery.wait_for_worker_s``, instead of failing at once."""
        wait_s = self.config.recovery.wait_for_worker_s
        deadline = time.monotonic() + wait_s
        waiting = False
        try:
            while True:
                live, cached = await self._match(chain)
                live = [w for w in self._staying(live) if w.worker_id not in gone]
                if decode_only:
                    live = [w for w in live if w.role == "decode"]
                try:
                    return self._placer.place_matched(prompt_tokens, live, cached, self.prefill_queue.tokens)
                except NoWorkerError:
                    if time.monotonic() >= deadline:
                        raise NoWorkerError(f"no live decode worker (waited {wait_s:g} s for one)") from None
                if not waiting:
                    waiting = True
                    self.metrics.waiting_for_worker.inc()
                    log.warning("request %s: no live decode worker, waiting up to %g s for one", rid, wait_s)
                await asyncio.sleep(_WORKER_POLL_S)
        finally:
            if waiting:
                self.metrics.waiting_for_worker.dec()

    async def _match(self, chain: list[bytes]) -> tuple[list, dict[str, int]]:
        """The live workers and each one's cached blocks of ``chain`` (none of a prompt shorter than a block)."""
        return await _call(self.index, "match", chain) if chain else (await self.live_workers(), {})

    async def _lost_worker(self, request_id: str, pool: str, lost: WorkerGoneError, computing_prompt: bool) -> None:
        """A worker died under a request: counted once per worker, logged with the request; charged to the
        request when it was computing its prompt there, and a request charged twice fails (a query of death)."""
        live = [w.worker_id for w in await self.live_workers() if w.role == pool]
        if self.losses.record(pool, lost.worker_id, live):
            self.metrics.worker_deaths.labels(pool).inc()
        self._forget(lost.worker_id)
        charged = self._deaths.get(request_id)
        if not computing_prompt or charged is None:
            log.warning("request %s: %s worker %s died (%s) after streaming from it", request_id, pool,
                        lost.worker_id, lost.reason)  # fmt: skip
            return
        charged.append(f"{pool} worker {lost.worker_id}: {lost.reason}")
        log.warning("request %s: %s worker %s died (%s) computing it (%d of %d allowed)", request_id, pool,
                    lost.worker_id, lost.reason, len(charged), _DEATHS_ALLOWED)  # fmt: skip

    def _check_not_poison(self, request_id: str) -> None:
        charged = self._deaths.get(request_id, [])
        if len(charged) > _DEATHS_ALLOWED:
            self.metrics.poison_requests.inc()
            raise PoisonRequestError(request_id, charged)

    def _release(self, request_id: str, worker_id: str | None = None) -> None:
        """Drop the request's claim on ``worker_id`` (all its claims when None), without waiting for the index."""
        if worker_id is None:
            claims = list(self._claims.pop(request_id, {}).values())
        else:
            claim = self._claims.get(request_id, {}).pop(worker_id, None)
            claims = [claim] if claim is not None else []
        if claims:
            self._in_background(_call(self.index, "release", claims))

    def _renew_claims(self) -> None:
        """Keep renewing running claims, so only a dead router's lapse."""
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._renew_every(self._claim_ttl_s / 3))

    async def _renew_every(self, period_s: float) -> None:
        while self._claims:
            await asyncio.sleep(period_s)
            try:
                claims = [claim for held in self._claims.values() for claim in held.values()]
                await _call(self.index, "reserve", claims, self._claim_ttl_s)
                await _call(self._registry, "renew", list(self._running))
            except Exception as exc:  # an index outage: the next renewal tries again
                log.warning("renewing %d placements in the index failed: %s", len(self._claims), exc)

    def _in_background(self, work) -> asyncio.Future:
        task = asyncio.ensure_future(work)
        self._background.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)
        return task

    async def _run(
        self,
        request: GenerateRequest,
        placement: Placement,
        hashes: list[str],
        start: float,
        placed_at: float,
        aborted: asyncio.Event,
    ) -> AsyncIterator[Chunk]:
        """``start``: when the request was admitted; ``placed_at``: when it was placed."""
        handle, prefilling, transfer_id = None, None, f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        if placement.prefill_worker is not None:
            handle, prefilling = await self._prefill(placement, PrefillJob(request, transfer_id, hashes))
        pool = "decode" if handle is None else "prefill"
        self.metrics.prompt_tokens.labels(pool).inc(len(request.prompt_token_ids))
        self.prompt_tokens_total += len(request.prompt_token_ids)
        progress = self._streams[request.request_id] = _Progress(start, placement, handle, transfer_id, placed_at)
        progress.prefill_hit = prefilling
        self._watch_drains()
        job = DecodeJob(request, handle, hashes)
        try:
            while True:
                try:
                    async for chunk in self._decode(job, progress, aborted):
                        yield chunk
                    return
                except WorkerGoneError as exc:
                    job = await self._migrate(request, progress, exc)
        finally:
            self._streams.pop(request.request_id, None)
            done = progress.taken and progress.finished
            if prefilling is not None and not done:
                prefilling.cancel()  # the request ended early: stop the prefill too (it frees its blocks)
            if handle is not None and not done:
                await self._abort_transfer(placement.prefill_worker, transfer_id)

    async def _decode(self, job: DecodeJob, progress: _Progress, aborted: asyncio.Event) -> AsyncIterator[Chunk]:
        """One decode worker's stream as chunks, its tokens recorded in ``progress`` for a migration."""
        rid = job.request.request_id
        progress.asked_at = time.perf_counter()
        stream = self._pools.decode(progress.decode_worker, job)
        stall_s = self.config.recovery.decode_stall_s
        progress.move.clear()
        progress.streamed_here = False
        try:
            async for delta in _until(stream, (aborted, progress.move), self._prefill_timeout_s + stall_s, stall_s):
                if delta is aborted:  # aborted by id: end the stream as vLLM does, finish reason "abort"
                    yield Chunk(rid, [], "", "abort")
                    return
                if delta is progress.move:
                    raise WorkerLeavingError(progress.decode_worker, "draining (Serve is stopping the replica)")
                progress.taken = True
                now = time.perf_counter()
                if delta.token_ids:
                    progress.streamed_here = True
                    if progress.first_at is None:
                        progress.first_at = now
                        if not (first_token := self._first_tokens[rid]).done():
                            first_token.set_result(progress.decode_worker)
                        self.metrics.ttft.observe(now - progress.start)
                        self._observe_ttft_parts(progress, now, delta.worker_first_delta_s)
                    else:
                        for _ in delta.token_ids:
                            self.metrics.itl.observe((now - progress.last_at) / len(delta.token_ids))
                    progress.last_at = now
                    progress.token_ids.extend(delta.token_ids)
                    self.metrics.generation_tokens.inc(len(delta.token_ids))
                if delta.finished:
                    progress.finished = True
                    yield self._last_chunk(rid, delta, progress, now, await self._usage(delta, progress))
                    return
                yield Chunk(rid, list(delta.token_ids), delta.text, logprobs=delta.logprobs,
                            prompt_logprobs=delta.prompt_logprobs, tool_calls=delta.tool_calls)  # fmt: skip
        except TimeoutError as exc:  # a hung or cut-off worker: as lost as a dead one
            raise WorkerGoneError(progress.decode_worker, str(exc)) from exc
        finally:
            await _close(stream)

    def _observe_ttft_parts(self, progress: _Progress, first_at: float, worker_s: float | None) -> None:
        """The time to the first token in its parts (``pdserve:time_to_first_token_part_seconds``); the worker's
        own share and the transit around it only where the first token came on the worker's first delta."""
        parts = {
            "placement": progress.placed_at - progress.start,
            "prefill_handle": progress.asked_at - progress.placed_at,
        }
        if worker_s is not None:
            parts |= {"worker": worker_s, "transit": max(0.0, first_at - progress.asked_at - worker_s)}
        for part, seconds in parts.items():
            self.metrics.ttft_parts.labels(part).observe(seconds)
        progress.ttft_parts = parts

    async def _migrate(self, request: GenerateRequest, progress: _Progress, lost: WorkerGoneError) -> DecodeJob:
        """Continue on another decode worker, which prefills the prompt and the tokens already streamed.

        The client's stream goes on where it stopped: no token repeated or missing. With migration
        off, or its attempts spent, the loss reaches the client (gRPC UNAVAILABLE / an HTTP error)."""
        rid = request.request_id
        progress.gone.add(progress.decode_worker)
        if isinstance(lost, WorkerLeavingError):
            self._forget(progress.decode_worker)
        else:
            await self._lost_worker(rid, "decode", lost, computing_prompt=not progress.streamed_here)
        self._release(rid, progress.decode_worker)
        self._check_not_poison(rid)
        recovery = self.config.recovery
        if not recovery.migrate_decode or progress.migrations >= recovery.max_migrations:
            raise lost
        if progress.token_ids and _reads_its_output(request.sampling):
            raise WorkerGoneError(lost.worker_id, f"{lost.reason}; {_NOT_MOVED}") from lost
        prompt = [*request.prompt_token_ids, *progress.token_ids]
        chain = hash_chain(self.model.model_id, prompt, self.model.block_size)
        try:
            placement = await self._place_when_live(rid, len(prompt), chain, True, frozenset(progress.gone))
        except NoWorkerError:
            raise lost from None
        if progress.handle is not None and progress.migrations == 0:  # the lost worker may not have pulled it
            self._in_background(self._abort_transfer(progress.placement.prefill_worker, progress.transfer_id))
        progress.migrations += 1
        progress.decode_worker = placement.decode_worker
        lacking = len(prompt) - placement.decode_cached_tokens
        claim = Claim(rid, placement.decode_worker, lacking, kv_tokens=lacking)
        self._claims.setdefault(rid, {})[claim.worker_id] = claim
        await _call(self.index, "reserve", [claim], self._claim_ttl_s)
        self.metrics.migrations.inc()
        progress.resumed_after = len(progress.token_ids)
        log.warning("request %s: %s; resumed on %s after %d tokens", rid, lost, claim.worker_id, progress.resumed_after)
        streamed, sampling = len(progress.token_ids), request.sampling
        sampling = replace(  # the prompt's logprobs went out with the first chunk
            sampling,
            max_tokens=sampling.max_tokens - streamed,
            min_tokens=max(sampling.min_tokens - streamed, 0),
            prompt_logprobs=None,
        )
        resumed = GenerateRequest(rid, prompt, sampling)
        return DecodeJob(resumed, None, [digest.hex() for digest in chain])

    def _staying(self, live: list) -> list:
        """Live workers less those leaving: placement stops choosing a draining replica at once."""
        leaving = self._pools.leaving()
        return [w for w in live if w.worker_id not in leaving] if leaving else live

    def _watch_drains(self) -> None:
        """With migration off, a draining replica's streams run until they end or Serve's deadline cuts them."""
        if not self.config.recovery.migrate_decode:
            return
        if self._drain_watch is None or self._drain_watch.done():
            self._drain_watch = asyncio.create_task(self._move_off_draining(0.25))

    async def _move_off_draining(self, period_s: float) -> None:
        """A stream on a draining decode worker has ``drain_finish_s`` to end there, then moves on
        (``_migrate``), so the replica empties before Serve's graceful-shutdown deadline."""
        finish_s = self.config.recovery.drain_finish_s
        while self._streams:
            await asyncio.sleep(period_s)
            leaving = self._pools.leaving()
            now = time.monotonic()
            for progress in self._streams.values():
                since = leaving.get(progress.decode_worker)
                if since is not None and now - since >= finish_s:
                    progress.move.set()

    def _forget(self, worker_id: str) -> None:
        """A worker that died stops counting at once, not when its heartbeat lapses; a live one re-registers."""
        self._in_background(_call(self.index, "forget_worker", worker_id))

    async def _prefill(self, placement: Placement, job: PrefillJob):
        """The transfer handle (None: prefill locally), and the prefill (still running when the handle came up
        front), whose result is the prompt tokens the prefill worker found cached.

        Leaving without the handle, the transfer is aborted by id: the prefill may have offered its
        blocks (or be about to) while the handle was on its way."""
        request, worker = job.request, placement.prefill_worker
        stream = self._pools.prefill(worker, job)
        try:
            first = await asyncio.wait_for(anext(stream), self._prefill_timeout_s)
        except (asyncio.CancelledError, GeneratorExit):
            await _close(stream)
            self._in_background(self._abort_transfer(worker, job.transfer_id))
            raise
        except Exception as exc:  # the decode worker prefills instead: the request is not lost
            await _close(stream)
            self._release(request.request_id, worker)
            if isinstance(exc, WorkerGoneError):
                await self._lost_worker(request.request_id, "prefill", exc, computing_prompt=True)
            else:  # e.g. too slow: it may still offer the blocks
                self._in_background(self._abort_transfer(worker, job.transfer_id))
            log.warning("prefill %s on %s failed, local: %s", job.transfer_id, worker, exc)
            self.metrics.prefill_fallbacks.inc()
            return None, None
        if first.finished:
            await _close(stream)
            self._release(request.request_id, worker)
            if first.handle is None:  # it ended with nothing offered (preempted, withdrawn): computed again locally
                log.warning("prefill %s on %s ended without offering its KV, local", job.transfer_id, worker)
                self.metrics.prefill_fallbacks.inc()
            finished = asyncio.get_running_loop().create_future()
            finished.set_result(first.cached_prompt_tokens)
            return first.handle, finished
        return first.handle, self._in_background(self._finish_prefill(job, stream, worker))

    async def _finish_prefill(
        self, job: PrefillJob, stream: AsyncIterator[PrefillResult], worker_id: str
    ) -> int | None:
        """Run an up-front prefill to its end: the prompt tokens it found cached (None: it failed, and the
        decode worker's pull fails and it recomputes)."""
        hit = None
        try:
            async with asyncio.timeout(self._prefill_timeout_s):
                async for result in stream:
                    hit = result.cached_prompt_tokens
        except Exception as exc:
            log.warning("prefill %s failed after its handle was given out: %r", job.transfer_id, exc)
            self.metrics.prefill_fallbacks.inc()  # the decode worker's pull fails, and it computes the prompt
            if isinstance(exc, WorkerGoneError):
                await self._lost_worker(job.request.request_id, "prefill", exc, computing_prompt=True)
            return None
        finally:
            self._release(job.request.request_id, worker_id)
            await _close(stream)
        return hit

    async def _abort_transfer(self, worker_id: str, transfer_id: str) -> None:
        try:
            await asyncio.shield(self._pools.abort_transfer(worker_id, transfer_id, 2.0))
        except Exception as exc:  # the lease frees it anyway
            log.info("abort of an untaken transfer on %s failed (the lease will free it): %s", worker_id, exc)

    async def _usage(self, delta: OutputDelta, progress: _Progress) -> Usage:
        """The prompt tokens found in a prefix cache, as measured, and counted per pool: the decode worker's
        own hit, and where it took the prompt's KV from a prefill worker, that worker's hit (the tokens it
        computed and moved are reported apart: vLLM counts them as the decode worker's cached tokens)."""
        prompt_tokens = delta.prompt_tokens - progress.resumed_after  # a migration's prompt has the tokens before
        # vLLM counts loaded tokens as cached; a load that failed and was recomputed may not be counted at all
        decode_hit = max(0, delta.cached_prompt_tokens - delta.kv_pulled_tokens)
        cached = decode_hit
        self.metrics.prefix_hit_tokens.labels("decode").inc(decode_hit)
        if delta.kv_pulled_tokens and progress.prefill_hit is not None:
            prefill_hit = await _result_within(progress.prefill_hit, _PREFILL_HIT_WAIT_S) or 0
            self.metrics.prefix_hit_tokens.labels("prefill").inc(prefill_hit)
            cached = max(decode_hit, prefill_hit)  # both are prefixes of the same prompt
        cached = min(cached, prompt_tokens)
        self.prefix_hit_tokens_total += cached
        return Usage(prompt_tokens, len(progress.token_ids), cached, delta.kv_pulled_tokens)

    def _last_chunk(self, request_id: str, delta: OutputDelta, progress: _Progress, now: float, usage: Usage) -> Chunk:
        placement, first_at = progress.placement, progress.first_at or now
        timing = Timing(
            ttft_s=first_at - progress.start,
            e2e_s=now - progress.start,
            placement="disaggregated" if progress.handle is not None else "local_prefill",
            prefill_worker=(placement.prefill_worker or "") if progress.handle is not None else "",
            decode_worker=progress.decode_worker,
            router=self.router_id,
            migrations=progress.migrations,
            ttft_parts=progress.ttft_parts,
        )
        tokens, text, reason = list(delta.token_ids), delta.text, delta.finish_reason
        return Chunk(request_id, tokens, text, reason, usage, timing, delta.stop_reason, delta.logprobs,
                     delta.prompt_logprobs, delta.tool_calls)  # fmt: skip

    async def live_workers(self) -> list:
        """The index's live workers, read off the event loop when the index is across the network."""
        try:
            return await _call(self.index, "live_workers")
        except Exception:  # an index outage: the health metric says so
            return []


_NOT_MOVED = "a structured or tool-calling output is not moved once it has begun"


def _reads_its_output(sampling: SamplingOptions) -> bool:
    """The decode worker keeps state over the output (a grammar, a tool-call parser) that another worker's
    vLLM would start over mid-output: such a stream is not moved once it has begun."""
    return sampling.structured is not None or sampling.tool_use is not None


async def _until(
    stream: AsyncIterator[OutputDelta], stops: tuple[asyncio.Event, ...], first_s: float, next_s: float
) -> AsyncIterator[OutputDelta | asyncio.Event]:
    """``stream``'s items until it ends, or the first of ``stops`` that is set (yielded, then the end);
    ``TimeoutError`` when the first item takes over ``first_s`` or a later one over ``next_s``."""
    waits = {asyncio.ensure_future(stop.wait()): stop for stop in stops}
    item = None
    deadline = first_s
    try:
        while True:
            item = asyncio.ensure_future(anext(stream))
            await asyncio.wait((item, *waits), timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
            stopped = next((stop for wait, stop in waits.items() if wait.done()), None)
            if stopped is not None:
                yield stopped
                return
            if not item.done():
                raise TimeoutError(f"no output for {deadline:g} s")
            try:
                yield item.result()
            except StopAsyncIteration:
                return
            deadline = next_s
    finally:
        for wait in waits:
            wait.cancel()
        if item is not None and not item.done():
            item.cancel()  # the pending read gets the cancellation, and closes ``stream`` on its way out


async def _unless_aborted(work: Awaitable[Placement], aborted: asyncio.Event) -> Placement | None:
    """``work``'s placement, or None where the request is aborted by id first (``work`` is then cancelled, and
    the claims it may have made are released with the request's)."""
    placing, stop = asyncio.ensure_future(work), asyncio.ensure_future(aborted.wait())
    try:
        await asyncio.wait({placing, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the request itself is cancelled
        placing.cancel()
        stop.cancel()
        await asyncio.gather(placing, stop, return_exceptions=True)
    return None if aborted.is_set() else placing.result()


async def _call(backend, method: str, *args):
    """A backend call: in a thread when it goes over the network, inline when it is in this process."""
    call = getattr(backend, method)
    return await asyncio.to_thread(call, *args) if backend.network_io else call(*args)


async def _result_within(future: asyncio.Future, timeout_s: float):
    """``future``'s result if it has one within ``timeout_s``; None if not (pending, cancelled or failed)."""
    if not future.done():
        await asyncio.wait({future}, timeout=timeout_s)
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()


async def _close(stream) -> None:
    close = getattr(stream, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except RuntimeError:  # a cancelled read is still unwinding it (see _until); it closes itself
        pass
