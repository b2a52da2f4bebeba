"""The simulated engine's scheduler: vLLM V1's continuous batching over the paged pool.

Every step has a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``).
Running sequences go first, one token each when decoding, the next chunk of their prompt when not;
when a running sequence needs a block and none is free, the most recently admitted one is preempted
(its blocks freed, its KV recomputed when it runs again), as vLLM does. Waiting sequences are admitted
in order while the budget, the cap and the pool allow, taking the longest cached prefix of their prompt
first. Sequences waiting for KV from a prefill worker hold their blocks and take no budget until it lands.

What a step did (``Step``) sets how long it takes (``HardwareProfile.step_s``); ``complete`` then
advances every scheduled sequence, caches the blocks it filled, and samples a token for each sequence
whose prompt is all computed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.block_hash import block_hash, hash_chain, root_hash
from engine.sim.kv_pool import KVPool


@dataclass
class SimSequence:
    request_id: str
    prompt: list[int]
    max_tokens: int
    sample: Callable[[], int]  # the next output token id; the engine's, seeded per request
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    remote_tokens: int = 0  # prompt tokens whose KV a prefill worker sends (a decode with a handle)
    hold_blocks: bool = False  # a prefill whose blocks stay for a puller after it ends
    tokens: list[int] = field(default_factory=list)  # prompt, then output
    computed: int = 0  # tokens whose KV is in the pool
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of every full block of ``tokens`` so far
    cached_blocks: int = 0  # leading blocks announced as cached (prefix-cache hits included)
    cached_prompt_tokens: int = 0  # found in the prefix cache when admitted
    awaiting_remote: bool = False  # admitted; its KV is on the way
    finish_reason: str | None = None
    preemptions: int = 0

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.computed


@dataclass(frozen=True)
class Step:
    scheduled: dict[str, int]  # request id → tokens computed this step
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    prefill_context_pairs: int = 0  # each prompt chunk's tokens times the tokens cached before it, summed
    preempted: tuple[str, ...] = ()


class Scheduler:
    def __init__(self, pool: KVPool, model_id: str, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, chunked_prefill: bool = True):  # fmt: skip
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self._root = root_hash(model_id)
        self._model_id = model_id
        self.waiting: deque[SimSequence] = deque()
        self.running: list[SimSequence] = []
        self.remote: dict[str, SimSequence] = {}  # admitted, waiting for their KV
        self.held: dict[str, SimSequence] = {}  # ended prefills whose blocks a puller still reads

    def add(self, seq: SimSequence) -> None:
        seq.hashes = hash_chain(self._model_id, seq.tokens, self.block_size)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request_id: str) -> SimSequence | None:
        """Take a sequence out wherever it is, freeing its blocks (an abort, or the end of a held prefill)."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.pool.free(seq.blocks)
                    seq.blocks = []
                    return seq
        seq = self.remote.pop(request_id, None) or self.held.pop(request_id, None)
        if seq is not None:
            self.pool.free(seq.blocks)
            seq.blocks = []
        return seq

    def remote_landed(self, request_id: str, ok: bool) -> None:
        """A pull ended: its tokens are computed (``ok``), or the prompt is computed here from the start."""
        seq = self.remote.pop(request_id, None)
        if seq is None:
            return
        seq.awaiting_remote = False
        if ok:  # the prompt's last token is computed here, for the first output token (as vLLM does)
            seq.computed = max(seq.computed, min(seq.remote_tokens, len(seq.prompt) - 1))
            self._cache_full_blocks(seq)
        seq.remote_tokens = 0  # preempted later, it is recomputed here
        self.running.append(seq)

    def schedule(self) -> Step | None:
        """The next step's work; None when there is none. A step may only preempt (nothing fits): it takes no
        time, but its preemptions must be seen."""
        budget = self.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        preempted: list[str] = []
        prefill = decode = context = pairs = 0
        position = 0
        while position < len(self.running):
            seq = self.running[position]
            want = min(seq.remaining, budget)
            if want == 0:
                break
            while not self._grow(seq, seq.computed + want):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                scheduled[seq.request_id] = want
                budget -= want
                if seq.remaining == 1:
                    decode, context = decode + 1, context + seq.computed
                else:
                    prefill, pairs = prefill + want, pairs + want * seq.computed
                position += 1
                continue
            break  # the sequence itself was preempted: nothing after it runs either
        while self.waiting and not preempted and budget > 0 and self._seqs() < self.max_num_seqs:
            seq = self.waiting[0]
            admitted = self._admit(seq, budget)
            if admitted is None:
                break
            self.waiting.popleft()
            if seq.awaiting_remote:
                self.remote[seq.request_id] = seq
                continue
            self.running.append(seq)
            scheduled[seq.request_id] = admitted
            budget -= admitted
            prefill, pairs = prefill + admitted, pairs + admitted * seq.computed
        if not scheduled and not preempted:
            return None
        return Step(scheduled, prefill, decode, context, pairs, tuple(preempted))

    def complete(self, step: Step) -> list[SimSequence]:
        """Advance what ``step`` scheduled; the sequences that got a token, in the order they ran."""
        sampled = []
        for seq in self.running:
            tokens = step.scheduled.get(seq.request_id)
            if tokens is None:
                continue
            seq.computed += tokens
            if seq.computed == len(seq.tokens):
                seq.tokens.append(seq.sample())
                self._cache_full_blocks(seq)
                sampled.append(seq)
            else:
                self._cache_full_blocks(seq)
        return sampled

    def finish(self, seq: SimSequence, reason: str) -> None:
        """``seq`` is done: its blocks are freed (or kept for a puller: ``hold_blocks``)."""
        seq.finish_reason = reason
        self.running.remove(seq)
        if seq.hold_blocks:
            self.held[seq.request_id] = seq
        else:
            self.pool.free(seq.blocks)
            seq.blocks = []

    # ----- internals ----------------------------------------------------------------------

    def _seqs(self) -> int:
        return len(self.running) + len(self.remote)

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def _grow(self, seq: SimSequence, tokens: int) -> bool:
        new = self._blocks_for(tokens) - len(seq.blocks)
        if new <= 0:
            return True
        if not self.pool.can_allocate((), new):
            return False
        seq.blocks += self.pool.allocate((), new)
        return True

    def _admit(self, seq: SimSequence, budget: int) -> int | None:
        """Blocks for ``seq``'s cached prefix and its first chunk (or for its pulled KV); None: it does not fit."""
        usable = (len(seq.tokens) - 1) // self.block_size  # the last token is always computed, as in vLLM
        hits = self.pool.cached_prefix(seq.hashes[:usable]) if seq.computed == 0 else []
        computed = max(seq.computed, len(hits) * self.block_size)
        if seq.remote_tokens > computed and seq.computed == 0:
            new = self._blocks_for(seq.remote_tokens) - len(hits)
            if not self.pool.can_allocate(hits, new):
                return None
            seq.blocks = self.pool.allocate(hits, new)
            seq.computed = computed
            seq.cached_prompt_tokens = computed
            seq.cached_blocks = len(hits)
            seq.awaiting_remote = True
            return 0
        want = min(len(seq.tokens) - computed, budget)
        if not self.chunked_prefill and want < len(seq.tokens) - computed:
            return None
        new = self._blocks_for(computed + want) - len(hits)  # a waiting sequence holds no blocks
        if not self.pool.can_allocate(hits, new):
            return None
        seq.blocks = self.pool.allocate(hits, new)
        if seq.computed == 0:
            seq.cached_prompt_tokens = computed
            seq.cached_blocks = len(hits)
        seq.computed = computed
        return want

    def _preempt(self, seq: SimSequence) -> None:
        self.pool.free(seq.blocks)
        seq.blocks, seq.computed, seq.cached_blocks = [], 0, 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _cache_full_blocks(self, seq: SimSequence) -> None:
        """Announce every block now full and computed, extending the chain over output tokens as it fills."""
        full = min(seq.computed, len(seq.tokens)) // self.block_size
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else self._root
            seq.hashes.append(block_hash(parent, seq.tokens[i * self.block_size : (i + 1) * self.block_size]))
        for i in range(seq.cached_blocks, min(full, len(seq.blocks))):
            self.pool.cache(seq.blocks[i], seq.hashes[i], seq.hashes[i - 1] if i else None)
        seq.cached_blocks = max(seq.cached_blocks, min(full, len(seq.blocks)))
