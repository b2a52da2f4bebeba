"""Placement: which prefill worker (or none) and which decode worker take a request.

Policies are small classes chosen by name (``round_robin``, ``least_loaded``,
``prefix_aware``). Each picks a prefill and a decode worker; one shared step
then applies conditional disaggregation: the decode worker prefills locally
when little of the prompt is uncached there, or when the prefill pool is
backlogged (every prefill worker queues more than ``prefill_queue_limit_tokens``)
and the decode worker would get to the prompt sooner (its own queue and the
prompt's tokens it lacks come to less than the chosen prefill worker's), as
Dynamo's conditional disaggregation prefills locally past a prefill queue
limit; a decode worker with prompts of its own queued stops taking more.

A prompt placed on a prefill worker stays there (vLLM cannot hand a queued
request to another engine), so ``prefill_dispatch_limit_tokens`` lets the
router hold a prompt instead while every prefill worker already has that
many tokens placed on it (``holds_for_prefill_room``; the queue itself is
``router/prefill_queue.py``), and places a prompt only on a worker under it
while one is. A worker's tokens here are the placements in flight on it, from
every router, released as each prefill ends: current where a heartbeat lags
by up to a beat, so a worker that has finished its queue is seen to have room
at once. Those held count toward the backlog above, shared evenly over the
pool, as the workers will queue them.

``prefix_aware`` scores every candidate by the work it would do for this
request, in prompt-token units, and takes the cheapest:

- prefill worker: uncached tokens + ``prefill_queue_weight`` × queued prefill tokens
- decode worker:  ``transfer_cost_per_token`` × tokens it lacks (shipped or recomputed)
  + ``decode_seq_cost_tokens`` × running sequences + ``decode_kv_cost_tokens`` × KV pool use

so a worker holding the prefix wins until its queue costs more than the
prefix saves, and then the request spills to the next best worker. The
heartbeat lags: queued prefill is the worker's last heartbeat plus the prompt
tokens placed on it since (by every router, through the index), and running
sequences are the heartbeat's or the requests in flight there, whichever is more.
KV pool use is the heartbeat's plus the KV placed on the worker since, or the KV
of every request in flight there (each the prompt tokens the worker lacks, its
new blocks), whichever is more: the second counts the requests placed before the
last heartbeat that the worker has not been handed yet (they wait for their
prefill worker's transfer handle). Without it a burst of long prompts went
to whichever decode workers had the emptiest pools at their last heartbeat (a
request in flight cost 64 tokens there against ~1,400 for a 2,080-token sequence
in a 6,144-token pool), and a third sequence waited for blocks on one while
others had room: on the prompt-heavy phase of ``pdserve bench autoscale
--engine simulated`` the fixed pools' TTFT misses fell from 25 to 6 with it.

``weighted_scores`` is llm-d's scheduler in the same place, for comparison: each candidate gets
scores in [0, 1] (prefix: the share of the prompt it holds; queue: min-max normalized over the
candidates, 1 for the shortest; KV: 1 − its pool's use, decode only), and the highest weighted sum
wins (weights: ``prefix_score_weight`` 3 and ``queue_score_weight`` 2, llm-d's default profile;
``kv_score_weight`` 0 unless set). It has no load bound.

A hot prefix is served fast from cache, so its holder's queue may never grow.
The load bound caps it, over the requests in flight from every router (``ceil(
load_bound`` × the fair share), or ``load_bound_floor``, as in consistent
hashing with bounded loads: N routers that see one hot prefix at once spread
it) and over this router's last ``balance_window`` placements (``load_bound``
× the fair share, which also copies hot prefixes onto a second worker). A
worker over either bound is skipped while others are under. Ties go round-robin.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from engine.block_hash import hash_chain
from router.index.base import PrefixIndex, WorkerInfo

PolicyName = Literal["round_robin", "least_loaded", "prefix_aware", "weighted_scores"]


class PlacementConfig(BaseModel):
    """Placement knobs; every field is documented where it is used (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicyName = "prefix_aware"
    local_prefill_max_uncached_tokens: int = Field(
        default=256, ge=0, description="the decode worker prefills locally when at most this many tokens are uncached"
    )
    prefill_queue_limit_tokens: int = Field(
        default=65536,
        ge=0,
        description="prefill pool backlogged (decode may prefill locally) when every worker queues more",
    )
    prefill_dispatch_limit_tokens: int | None = Field(
        default=None,
        ge=1,
        description="hold a prompt in the router while every prefill worker has this many tokens placed on it",
    )
    prefill_hold_max_s: float = Field(
        default=30.0, gt=0, description="a prompt held this long is placed anyway, over the dispatch limit"
    )
    prefill_queue_weight: float = Field(default=1.0, ge=0, description="cost of a queued prefill token")
    transfer_cost_per_token: float = Field(default=0.25, ge=0, description="cost of a token the decode worker lacks")
    decode_seq_cost_tokens: float = Field(default=64.0, ge=0, description="cost of one running decode sequence")
    decode_kv_cost_tokens: float = Field(default=4096.0, ge=0, description="cost of a full decode KV pool")
    load_bound: float = Field(
        default=1.3, ge=1.0, description="max share of requests in flight and of recent placements, over fair share"
    )
    load_bound_floor: int = Field(
        default=2, ge=1, description="requests in flight a worker may always have, whatever its share"
    )
    balance_window: int = Field(default=256, ge=1, description="this router's placements the load bound looks back on")
    prefix_score_weight: float = Field(default=3.0, ge=0, description="weighted_scores: weight of the prefix score")
    queue_score_weight: float = Field(default=2.0, ge=0, description="weighted_scores: weight of the queue score")
    kv_score_weight: float = Field(default=0.0, ge=0, description="weighted_scores: weight of the KV-use score")


@dataclass(frozen=True)
class Candidate:
    worker: WorkerInfo
    cached_tokens: int


@dataclass(frozen=True)
class Placement:
    """``prefill_worker`` None means the decode worker prefills locally."""

    prefill_worker: str | None
    decode_worker: str
    prefill_cached_tokens: int
    decode_cached_tokens: int
    outcome: Literal["disaggregated", "local_prefill"]
    reason: str


class NoWorkerError(RuntimeError):
    """No live decode worker: maps to HTTP 503 / gRPC UNAVAILABLE."""


class PlacementPolicy(Protocol):
    name: str

    def choose(
        self, prompt_tokens: int, prefill: Sequence[Candidate], decode: Sequence[Candidate]
    ) -> tuple[Candidate | None, Candidate]:
        """Pick a prefill candidate (None when there is none) and a decode candidate (never empty)."""


class RoundRobin:
    name = "round_robin"

    def __init__(self, config: PlacementConfig):
        self._turn = itertools.count()

    def choose(self, prompt_tokens, prefill, decode):
        turn = next(self._turn)
        return (_by_id(prefill)[turn % len(prefill)] if prefill else None), _by_id(decode)[turn % len(decode)]


class LeastLoaded:
    name = "least_loaded"

    def __init__(self, config: PlacementConfig):
        self._config = config
        self._turn = itertools.count()

    def choose(self, prompt_tokens, prefill, decode):
        turn = next(self._turn)
        best_prefill = min(_rotated(prefill, turn), key=_queued_prefill) if prefill else None
        return best_prefill, min(_rotated(decode, turn), key=lambda c: _decode_load_cost(c.worker, self._config))


class PrefixAware:
    name = "prefix_aware"

    def __init__(self, config: PlacementConfig):
        self._config = config
        bound = (config.balance_window, config.load_bound, config.load_bound_floor)
        self._prefill_share = _RecentShare(*bound)
        self._decode_share = _RecentShare(*bound)

    def choose(self, prompt_tokens, prefill, decode):
        config = self._config

        def prefill_cost(c: Candidate) -> float:
            return (prompt_tokens - c.cached_tokens) + config.prefill_queue_weight * _queued_prefill(c)

        def decode_cost(c: Candidate) -> float:
            lacking = prompt_tokens - c.cached_tokens
            return config.transfer_cost_per_token * lacking + _decode_load_cost(c.worker, config)

        chosen_prefill = self._prefill_share.pick(prefill, prefill_cost) if prefill else None
        return chosen_prefill, self._decode_share.pick(decode, decode_cost)


class _RecentShare:
    """Cheapest candidate among those under the load bound of recent placements; ties rotate."""

    def __init__(self, window: int, bound: float, floor: int):
        self._recent: deque[str] = deque(maxlen=window)
        self._counts: Counter[str] = Counter()
        self._bound = bound
        self._floor = floor
        self._turn = itertools.count()

    def pick(self, candidates: Sequence[Candidate], cost) -> Candidate:
        ordered = _rotated(candidates, next(self._turn))
        flights = _in_flight_bounded(ordered, self._bound, self._floor)
        capacity = math.ceil(self._bound * (len(self._recent) + 1) / len(ordered))
        under = [c for c in flights if self._counts[c.worker.worker_id] + 1 <= capacity] or flights
        chosen = min(under, key=cost)
        self._record(chosen.worker.worker_id)
        return chosen

    def _record(self, worker_id: str) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._counts[self._recent[0]] -= 1
        self._recent.append(worker_id)
        self._counts[worker_id] += 1


class WeightedScores:
    name = "weighted_scores"

    def __init__(self, config: PlacementConfig):
        self._config = config
        self._turn = itertools.count()

    def choose(self, prompt_tokens, prefill, decode):
        turn = next(self._turn)

        def decode_queue(c: Candidate) -> float:
            return max(c.worker.load.running_seqs + c.worker.load.waiting_seqs, c.worker.in_flight.requests)

        prefill_pool = _rotated(prefill, turn)
        chosen_prefill = self._best(prefill_pool, prompt_tokens, _queued_prefill, kv=False) if prefill else None
        return chosen_prefill, self._best(_rotated(decode, turn), prompt_tokens, decode_queue, kv=True)

    def _best(self, candidates: list[Candidate], prompt_tokens: int, queue, kv: bool) -> Candidate:
        config = self._config
        queues = [queue(c) for c in candidates]
        shortest, longest = min(queues), max(queues)

        def score(c: Candidate, waiting: float) -> float:
            queue_score = (longest - waiting) / (longest - shortest) if longest > shortest else 1.0
            kv_score = 1.0 - min(_decode_kv_fraction(c.worker), 1.0) if kv else 0.0
            return (config.prefix_score_weight * c.cached_tokens / max(prompt_tokens, 1)
                    + config.queue_score_weight * queue_score + config.kv_score_weight * kv_score)  # fmt: skip

        scored = [score(c, waiting) for c, waiting in zip(candidates, queues, strict=True)]
        return candidates[max(range(len(candidates)), key=lambda i: (scored[i], -i))]  # ties: the first in turn


POLICIES: dict[str, type[PlacementPolicy]] = {p.name: p for p in (RoundRobin, LeastLoaded, PrefixAware, WeightedScores)}


def make_policy(config: PlacementConfig) -> PlacementPolicy:
    return POLICIES[config.policy](config)


class Placer:
    """Hash a prompt, ask the index once, and place it with the configured policy."""

    def __init__(self, index: PrefixIndex, config: PlacementConfig, model_id: str, block_size: int):
        self._index = index
        self._config = config
        self._policy = make_policy(config)
        self._model_id = model_id
        self._block_size = block_size

    def place(self, token_ids: Sequence[int]) -> Placement:
        chain = hash_chain(self._model_id, token_ids, self._block_size)
        live, cached_blocks = self._index.match(chain)
        return self.place_matched(len(token_ids), live, cached_blocks)

    def place_matched(
        self, prompt_tokens: int, live: Sequence[WorkerInfo], cached_blocks: dict[str, int], held_tokens: int = 0
    ) -> Placement:
        """``held_tokens``: prompt tokens the router holds for the prefill pool, ahead of this one."""
        candidates = self._candidates(prompt_tokens, live, cached_blocks)
        if not candidates["decode"]:
            raise NoWorkerError("no live decode worker")
        pool = candidates["prefill"]
        limit = self._config.prefill_dispatch_limit_tokens
        with_room = [c for c in pool if _placed_prefill(c) < limit] if limit is not None else pool
        prefill, decode = self._policy.choose(prompt_tokens, with_room or pool, candidates["decode"])
        return self._disaggregate_or_not(prompt_tokens, prefill, decode, pool, held_tokens)

    def holds_for_prefill_room(
        self, prompt_tokens: int, live: Sequence[WorkerInfo], cached_blocks: dict[str, int], held_tokens: int = 0
    ) -> bool:
        """Whether this prompt should wait in the router: it is one for a prefill worker (not short where a decode
        worker has its prefix), every prefill worker has ``prefill_dispatch_limit_tokens`` or more placed on it,
        and the pool is not so far behind that conditional disaggregation may give it to a decode worker (then
        placing decides)."""
        limit = self._config.prefill_dispatch_limit_tokens
        candidates = self._candidates(prompt_tokens, live, cached_blocks)
        pool, decode = candidates["prefill"], candidates["decode"]
        if limit is None or not pool or not decode:
            return False
        best_cached = max(c.cached_tokens for c in decode)
        if prompt_tokens - best_cached <= self._config.local_prefill_max_uncached_tokens:
            return False
        least = min(_placed_prefill(c) for c in pool)
        return least >= limit and least + held_tokens / len(pool) <= self._config.prefill_queue_limit_tokens

    def _candidates(
        self, prompt_tokens: int, live: Sequence[WorkerInfo], cached_blocks: dict[str, int]
    ) -> dict[str, list[Candidate]]:
        candidates: dict[str, list[Candidate]] = {"prefill": [], "decode": []}
        for worker in live:
            # A worker that advertises another block size shares no keys with this chain.
            blocks = cached_blocks.get(worker.worker_id, 0) if worker.block_size == self._block_size else 0
            # The last prompt token is always computed: it yields the first output token.
            cached = min(blocks * self._block_size, prompt_tokens - 1)
            candidates[worker.role].append(Candidate(worker, cached))
        return candidates

    def _disaggregate_or_not(
        self, prompt_tokens: int, prefill: Candidate | None, decode: Candidate, pool: Sequence[Candidate],
        held_tokens: int,
    ) -> Placement:  # fmt: skip
        config = self._config
        if prefill is None:
            reason = "no_prefill_worker"
        elif prompt_tokens - decode.cached_tokens <= config.local_prefill_max_uncached_tokens:
            reason = "short_uncached"
        elif self._backlogged(prompt_tokens, prefill, decode, pool, held_tokens / len(pool)):
            reason = "prefill_saturated"
        else:
            return Placement(
                prefill.worker.worker_id,
                decode.worker.worker_id,
                prefill.cached_tokens,
                decode.cached_tokens,
                "disaggregated",
                self._policy.name,
            )
        return Placement(None, decode.worker.worker_id, 0, decode.cached_tokens, "local_prefill", reason)

    def _backlogged(
        self, prompt_tokens: int, prefill: Candidate, decode: Candidate, pool: Sequence[Candidate], ahead: float
    ) -> bool:
        """Every prefill worker queues past the limit (``ahead``: its share of the prompts the router holds), and
        the decode worker would get to the prompt sooner (its queue and the prompt's tokens it lacks, against the
        chosen prefill worker's)."""
        if any(_queued_prefill(c) + ahead <= self._config.prefill_queue_limit_tokens for c in pool):
            return False
        local = _queued_prefill(decode) + prompt_tokens - decode.cached_tokens
        return local < _queued_prefill(prefill) + ahead + prompt_tokens - prefill.cached_tokens


def _in_flight_bounded(candidates: list[Candidate], bound: float, floor: int) -> list[Candidate]:
    """Those that may take one more request in flight: ``ceil(bound × fair share)``, or ``floor``, counting this one.

    The counts are every router's placements (the shared index), so routers
    that see one hot prefix at once spread it instead of piling onto its holder.
    Never empty: a worker at or under the mean is always under the bound.
    """
    total = sum(c.worker.in_flight.requests for c in candidates) + 1
    capacity = max(floor, math.ceil(bound * total / len(candidates)))
    return [c for c in candidates if c.worker.in_flight.requests + 1 <= capacity]


def _by_id(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Stable order, so ties break the same way on every router."""
    return sorted(candidates, key=lambda c: c.worker.worker_id)


def _queued_prefill(candidate: Candidate) -> int:
    """The worker's last heartbeat, plus what routers have placed on it since."""
    worker = candidate.worker
    return worker.load.queued_prefill_tokens + worker.in_flight.unreported_tokens


def _placed_prefill(candidate: Candidate) -> int:
    """The prompt tokens routers have placed on the worker and not seen finish: its queue as of now, whatever
    its heartbeat's age (a prompt counts whole until its prefill ends)."""
    return candidate.worker.in_flight.tokens


def _rotated(candidates: Sequence[Candidate], turn: int) -> list[Candidate]:
    """Stable order shifted by ``turn``, so ``min`` breaks ties round-robin."""
    ordered = _by_id(candidates)
    shift = turn % len(ordered) if ordered else 0
    return ordered[shift:] + ordered[:shift]


def _decode_load_cost(worker: WorkerInfo, config: PlacementConfig) -> float:
    load = worker.load
    sequences = max(load.running_seqs + load.waiting_seqs, worker.in_flight.requests)
    return config.decode_seq_cost_tokens * sequences + config.decode_kv_cost_tokens * _decode_kv_fraction(worker)


def _decode_kv_fraction(worker: WorkerInfo) -> float:
    """The share of the worker's KV pool in use or placed: above 1 where requests will wait for blocks."""
    load, flights = worker.load, worker.in_flight
    if not load.kv_pool_tokens:  # a worker that does not report its pool's size: its heartbeat's figure
        return load.kv_used_fraction
    since_beat = load.kv_used_fraction + flights.unreported_kv_tokens / load.kv_pool_tokens
    return max(since_beat, flights.kv_tokens / load.kv_pool_tokens)
