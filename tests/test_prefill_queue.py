"""The router's queue for prompts the prefill pool has no room for: arrival order, counts, deadline."""

from __future__ import annotations

import asyncio

from router.prefill_queue import PrefillQueue


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


class Pool:
    """Room for ``room`` more prompts, handed out as they are placed."""

    def __init__(self, room: int = 0):
        self.room = room
        self.placed: list[str] = []

    async def full(self) -> bool:
        return self.room <= 0

    async def place(self, queue: PrefillQueue, name: str, tokens: int = 100, max_wait_s: float = 5.0) -> bool:
        async with queue.turn(tokens, self.full, max_wait_s) as room:
            if room:
                self.room -= 1
            self.placed.append(name)
            return room


def test_held_prompts_are_placed_in_arrival_order_as_room_comes():
    async def scenario():
        queue, pool = PrefillQueue(poll_s=0.01), Pool()
        placing = []
        for name in "abcd":
            placing.append(asyncio.ensure_future(pool.place(queue, name)))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert (queue.requests, queue.tokens, pool.placed) == (4, 400, [])
        pool.room = 4
        assert await asyncio.gather(*placing) == [True] * 4
        assert (queue.requests, queue.tokens, pool.placed) == (0, 0, list("abcd"))

    run(scenario())


def test_the_next_prompt_looks_for_room_only_after_the_one_before_is_placed():
    async def scenario():
        queue, pool = PrefillQueue(poll_s=0.01), Pool(room=1)
        first, second = pool.place(queue, "a"), pool.place(queue, "b", max_wait_s=0.2)
        assert await asyncio.gather(first, second) == [True, False]  # one room: taken by the first only
        assert pool.placed == ["a", "b"]

    run(scenario())


def test_a_prompt_held_past_its_deadline_is_let_through_without_room():
    async def scenario():
        queue, pool = PrefillQueue(poll_s=0.01), Pool()
        assert await pool.place(queue, "a", max_wait_s=0.1) is False
        assert pool.placed == ["a"] and queue.requests == 0

    run(scenario())


def test_a_prompt_cancelled_while_held_leaves_nothing_counted_and_the_next_one_moves_up():
    async def scenario():
        changes = []
        queue, pool = PrefillQueue(on_change=lambda r, t: changes.append((r, t)), poll_s=0.01), Pool()
        held = asyncio.ensure_future(pool.place(queue, "a"))
        behind = asyncio.ensure_future(pool.place(queue, "b", tokens=50))
        await asyncio.sleep(0.05)
        held.cancel()
        await asyncio.sleep(0.05)
        assert (queue.requests, queue.tokens) == (1, 50)
        pool.room = 1
        assert await behind is True
        assert pool.placed == ["b"] and changes[-1] == (0, 0)

    run(scenario())
