"""The router's queue for prompts the prefill pool has no room for: late binding.

A prompt placed on a prefill worker stays there: vLLM cannot hand a queued request to another engine.
Pushed straight to the workers, a burst that outruns the prefill pool piles onto the replicas that exist
when it arrives; a replica the autoscaler adds seconds later gets only what arrives after it starts, while
the backlog drains at the old replicas' pace. With ``placement.prefill_dispatch_limit_tokens`` set, a
prompt that arrives while every prefill worker has that many prompt tokens placed on it and not yet
computed (``Placer.holds_for_prefill_room``) waits here instead, in arrival order, and is placed once a
worker has room or a new one joins, over the workers live then, as llm-d's flow control and Dynamo's
router queue hold requests. The prompts held count toward the prefill pool's load for the autoscaler (the
Router deployment's ``record_autoscaling_stats``, read by ``CoordinatedPolicy``).

One prompt at a time is at the head: it looks for room and is placed and reserved in the index before the
next one looks, so the next sees that placement. Nothing waits unbounded: a prompt not placed within
``prefill_hold_max_s`` of arriving is placed anyway, over the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable


class PrefillQueue:
    """The prompts held, in arrival order; ``requests`` and ``tokens`` are the figures the autoscaler reads,
    handed to ``on_change`` whenever they change (the router's gauges)."""

    def __init__(self, on_change: Callable[[int, int], None] = lambda requests, tokens: None, poll_s: float = 0.1):
        self._head = asyncio.Lock()  # asyncio's lock wakes its waiters in the order they came: arrival order
        self._on_change = on_change
        self._poll_s = poll_s
        self.requests = 0
        self.tokens = 0

    @contextlib.asynccontextmanager
    async def turn(
        self, tokens: int, still_full: Callable[[], Awaitable[bool]], max_wait_s: float
    ) -> AsyncIterator[bool]:
        """Wait for this prompt's turn at the head, then while ``still_full()`` (asked every ``poll_s``). Yields
        whether room came (False: ``max_wait_s`` passed first); the caller places the prompt inside, and the next
        in line waits until it leaves."""
        deadline = time.monotonic() + max_wait_s
        at_head = False
        try:
            self._count(1, tokens)
            try:
                at_head = await _acquired(self._head, max_wait_s)
                room = at_head and await self._room_by(still_full, deadline)
            finally:
                self._count(-1, -tokens)
            yield room
        finally:
            if at_head:
                self._head.release()

    def _count(self, requests: int, tokens: int) -> None:
        self.requests += requests
        self.tokens += tokens
        self._on_change(self.requests, self.tokens)

    async def _room_by(self, still_full: Callable[[], Awaitable[bool]], deadline: float) -> bool:
        while await still_full():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self._poll_s)
        return True


async def _acquired(lock: asyncio.Lock, timeout_s: float) -> bool:
    try:
        return await asyncio.wait_for(lock.acquire(), timeout_s)
    except TimeoutError:
        return False
