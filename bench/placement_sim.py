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

import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.block_hash import hash_chain
from engine.cache_events import BlocksRemoved, BlocksStored
from router.index import MemoryPrefixIndex, PrefixIndex, WorkerInfo, WorkerLoad
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
) -> SimResult:
    """Replay ``trace`` with ``policy`` (a placement policy name, or ``oracle``)."""
    index = index if index is not None else MemoryPrefixIndex()
    sims = {f"prefill-{i}": SimWorker(f"prefill-{i}", capacity_blocks, tokens_per_s) for i in range(workers)}
    # Every request is disaggregated here: the simulator measures the prefill pool's cache.
    config = (placement or PlacementConfig()).model_copy(
        update={"policy": "prefix_aware" if policy == "oracle" else policy, "local_prefill_max_uncached_tokens": 0}
    )
    placer = Placer(index, config, model_id, block_size)
    index.heartbeat(WorkerInfo(DECODE_ID, "decode", 1, block_size), ttl_s=1e9)
    for sim in sims.values():
        _heartbeat(index, sim, block_size, 0.0)
    cached_total = prompt_total = 0
    for request in trace:
        now, tokens = request.arrival_s, request.token_ids
        chain = hash_chain(model_id, tokens, block_size)
        if policy == "oracle":
            target = max(sims.values(), key=lambda s: (s.cached_blocks(chain), -s.busy_until_s))
        else:
            for sim in sims.values():
                _heartbeat(index, sim, block_size, now)
            target = sims[placer.place(tokens).prefill_worker]
        cached, events = target.serve(chain, len(tokens), block_size, now)
        index.apply_events(target.worker_id, 1, events)
        cached_total += cached
        prompt_total += len(tokens)
    counts = [s.requests for s in sims.values()]
    mean = sum(counts) / len(counts)
    return SimResult(policy, cached_total / prompt_total, max(counts) / mean, counts)


def _heartbeat(index: PrefixIndex, sim: SimWorker, block_size: int, now_s: float) -> None:
    load = WorkerLoad(queued_prefill_tokens=sim.queued_tokens(now_s))
    index.heartbeat(WorkerInfo(sim.worker_id, "prefill", 1, block_size, load), ttl_s=1e9)
