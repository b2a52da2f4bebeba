"""Placement simulator: the real policies and the real index, driven by simulated workers.

Each simulated prefill worker is an LRU cache of a fixed number of blocks that
emits real ``stored``/``removed`` cache events into the index, and a queue of
prefill work (tokens at a fixed rate) that it heartbeats as its load. A trace
of requests (arrival time + token ids) is replayed in time order; each request
is placed by a ``Placer`` (or by the oracle, which sees every cache directly),
served on the chosen worker, and scored by the prefix tokens its cache held.

It is the tool for sizing clusters: change the trace, the worker count, the
cache size or the rate and read the hit rate and the balance.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from engine.block_hash import hash_chain
from engine.cache_events import BlocksRemoved, BlocksStored
from router.index import Claim, MemoryPrefixIndex, PrefixIndex, WorkerInfo, WorkerLoad
from router.placement import PlacementConfig, Placer

DECODE_ID = "decode-0"


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    token_ids: list[int]


@dataclass(frozen=True)
class SharedPrefixTrace:
    """System prompts drawn Zipf(``zipf_s``), each followed by a unique suffix; Poisson arrivals."""

    system_prompts: int = 200
    min_prompt_tokens: int = 1024
    max_prompt_tokens: int = 4096
    suffix_tokens: int = 128
    zipf_s: float = 1.1
    requests: int = 4000
    rate_per_s: float = 20.0
    vocab_size: int = 32000
    seed: int = 0

    def working_set_tokens(self) -> int:
        return sum(len(p) for p in self._prompts(random.Random(self.seed)))

    def __iter__(self) -> Iterator[TraceRequest]:
        rng = random.Random(self.seed)
        prompts = self._prompts(rng)
        weights = [1.0 / (k + 1) ** self.zipf_s for k in range(len(prompts))]
        now = 0.0
        for _ in range(self.requests):
            now += rng.expovariate(self.rate_per_s)
            prompt = rng.choices(prompts, weights)[0]
            suffix = [rng.randrange(2, self.vocab_size) for _ in range(self.suffix_tokens)]
            yield TraceRequest(now, prompt + suffix)

    def _prompts(self, rng: random.Random) -> list[list[int]]:
        return [
            [
                rng.randrange(2, self.vocab_size)
                for _ in range(rng.randint(self.min_prompt_tokens, self.max_prompt_tokens))
            ]
            for _ in range(self.system_prompts)
        ]


@dataclass
class SimWorker:
    worker_id: str
    capacity_blocks: int
    tokens_per_s: float
    cache: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    busy_until_s: float = 0.0
    requests: int = 0

    def cached_blocks(self, chain: list[bytes]) -> int:
        count = 0
        for digest in chain:
            if digest not in self.cache:
                break
            count += 1
        return count

    def queued_tokens(self, now_s: float) -> int:
        return int(max(0.0, self.busy_until_s - now_s) * self.tokens_per_s)

    def serve(self, chain: list[bytes], prompt_tokens: int, block_size: int, now_s: float):
        """Prefill on this worker; returns (cached tokens, cache events)."""
        hit = self.cached_blocks(chain)
        for digest in chain[:hit]:
            self.cache.move_to_end(digest)
        stored = chain[hit:]
        for digest in stored:
            self.cache[digest] = None
        evicted = []
        while len(self.cache) > self.capacity_blocks:
            evicted.append(self.cache.popitem(last=False)[0])
        cached_tokens = hit * block_size
        start = max(now_s, self.busy_until_s)
        self.busy_until_s = start + (prompt_tokens - cached_tokens) / self.tokens_per_s
        self.requests += 1
        events = []
        if stored:
            events.append(BlocksStored(stored, chain[hit - 1] if hit else None))
        if evicted:
            events.append(BlocksRemoved(evicted))
        return cached_tokens, events


@dataclass(frozen=True)
class SimResult:
    policy: str
    hit_rate: float
    load_imbalance: float
    requests_per_worker: list[int]


class _Deliveries:
    """Index writes that land later than they happen: the view delay between workers and routers."""

    def __init__(self):
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, when_s: float, write: Callable[[], None]) -> None:
        heapq.heappush(self._due, (when_s, next(self._order), write))

    def until(self, now_s: float) -> None:
        while self._due and self._due[0][0] <= now_s:
            heapq.heappop(self._due)[2]()


def simulate(
    trace,
    policy: str,
    workers: int = 8,
    capacity_blocks: int = 4000,
    block_size: int = 16,
    tokens_per_s: float = 50_000.0,
    index: PrefixIndex | None = None,
    model_id: str = "sim",
    placement: PlacementConfig | None = None,
    routers: int = 1,
    view_delay_s: float = 0.0,
    shared_index: bool = True,
) -> SimResult:
    """Replay ``trace`` with ``policy`` (a placement policy name, or ``oracle``).

    Requests go to ``routers`` routers in turn, each with its own policy state.
    Cache events and heartbeats reach the index ``view_delay_s`` after they
    happen (event batching, heartbeat period); a router's reservation of a
    worker counts at once for every router sharing the index (a Redis round
    trip, far shorter than the gaps between arrivals). ``shared_index=False``
    gives each router a private index that hears only of its own placements
    (their cache events and reservations), as routers that each keep their own
    prefix tree do.
    """
    if not shared_index and index is not None:
        raise ValueError("a private index per router is always in memory")
    views = [index if index is not None else MemoryPrefixIndex()] if shared_index else []
    views += [MemoryPrefixIndex() for _ in range(routers - len(views))]
    sims = {f"prefill-{i}": SimWorker(f"prefill-{i}", capacity_blocks, tokens_per_s) for i in range(workers)}
    # Every request is disaggregated here: the simulator measures the prefill pool's cache.
    config = (placement or PlacementConfig()).model_copy(
        update={"policy": "prefix_aware" if policy == "oracle" else policy, "local_prefill_max_uncached_tokens": 0}
    )
    placers = [Placer(views[r % len(views)], config, model_id, block_size) for r in range(routers)]
    deliveries = _Deliveries()
    for view in views:
        view.heartbeat(WorkerInfo(DECODE_ID, "decode", 1, block_size), ttl_s=1e9)
        for sim in sims.values():
            view.heartbeat(WorkerInfo(sim.worker_id, "prefill", 1, block_size), ttl_s=1e9)
    cached_total = prompt_total = 0
    for number, request in enumerate(trace):
        now, tokens = request.arrival_s, request.token_ids
        for sim in sims.values():  # each worker's heartbeat, as of now, lands after the view delay
            info = WorkerInfo(sim.worker_id, "prefill", 1, block_size, WorkerLoad(sim.queued_tokens(now)))
            for view in views:
                deliveries.at(now + view_delay_s, functools.partial(view.heartbeat, info, 1e9))
        deliveries.until(now)
        chain = hash_chain(model_id, tokens, block_size)
        own = views[number % routers % len(views)]
        if policy == "oracle":
            target = max(sims.values(), key=lambda s: (s.cached_blocks(chain), -s.busy_until_s))
        else:
            target = sims[placers[number % routers].place(tokens).prefill_worker]
        cached, events = target.serve(chain, len(tokens), block_size, now)
        claim = Claim(str(number), target.worker_id, len(tokens) - cached)
        own.reserve([claim], ttl_s=1e9)
        deliveries.at(target.busy_until_s, functools.partial(own.release, [claim]))
        for view in views if shared_index else [own]:
            deliveries.at(now + view_delay_s, functools.partial(view.apply_events, target.worker_id, 1, events))
        cached_total += cached
        prompt_total += len(tokens)
    counts = [s.requests for s in sims.values()]
    mean = sum(counts) / len(counts)
    return SimResult(policy, cached_total / prompt_total, max(counts) / mean, counts)
