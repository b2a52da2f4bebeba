"""The simulated engine's paged KV pool: vLLM's block pool and prefix cache, without the tensors.

As in vLLM's ``BlockPool``: a block is in use while a request references it; a free block keeps its
cached prefix until it is reused, and free blocks are reused least recently freed first (a request's
blocks are freed tail first, so a prefix outlives its suffix). Blocks are cached under pdserve's chained
block hash, so what this pool announces (``BlocksStored``, ``BlocksRemoved``) is what a vLLM worker
announces through ``engine.cache_events``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.cache_events import AllCleared, BlocksRemoved, BlocksStored, CacheEvent


class KVPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # block hash → the block holding it
        self._free: OrderedDict[int, None] = OrderedDict((block, None) for block in range(num_blocks))
        self._events: list[CacheEvent] = []

    @property
    def free_blocks(self) -> int:
        """Blocks no request references (cached ones among them: reusable, evicted when reused)."""
        return len(self._free)

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix of ``hashes``."""
        blocks = []
        for digest in hashes:
            block = self._cached.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_allocate(self, hits: Sequence[int], new: int) -> bool:
        """Whether ``new`` fresh blocks fit beside taking ``hits`` (a free cached hit is no longer free)."""
        return new + sum(1 for block in hits if self._refs[block] == 0) <= len(self._free)

    def allocate(self, hits: Sequence[int], new: int) -> list[int]:
        """Reference ``hits`` and ``new`` fresh blocks (evicting the least recently freed); check first."""
        if not self.can_allocate(hits, new):
            raise ValueError(f"{new} new blocks and {len(hits)} hits do not fit in {len(self._free)} free")
        for block in hits:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        fresh = []
        for _ in range(new):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._refs[block] = 1
            fresh.append(block)
        return [*hits, *fresh]

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each, tail first: a block nobody references is reusable, still cached."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def cache(self, block: int, digest: bytes, parent: bytes | None) -> None:
        """``block`` is full and computed: its prefix is reusable under ``digest`` (``parent``: the block
        before it in its chain; None for the first)."""
        if self._hash_of[block] is not None or digest in self._cached:
            return  # cached already, here or in another block holding the same tokens
        self._hash_of[block] = digest
        self._cached[digest] = block
        self._events.append(BlocksStored([digest], parent))

    def reset(self) -> bool:
        """Forget every cached prefix; refused (False) while any block is in use, as vLLM refuses."""
        if len(self._free) < self.num_blocks:
            return False
        self._cached.clear()
        self._hash_of = [None] * self.num_blocks
        self._events.append(AllCleared())
        return True

    def take_events(self) -> list[CacheEvent]:
        events, self._events = self._events, []
        return events

    def _evict(self, block: int) -> None:
        digest = self._hash_of[block]
        if digest is not None:
            self._hash_of[block] = None
            del self._cached[digest]
            self._events.append(BlocksRemoved([digest]))
