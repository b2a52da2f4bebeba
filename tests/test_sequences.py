"""A request's several sequences read as one: a failure ends them all, an early close stops every read."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from router.sequences import all_or_none, interleaved
from router.service import Chunk


class Sequence:
    """A stream of ``steps`` chunks, one every ``pause_s``; it records whether it was closed before its end."""

    def __init__(self, name: str, steps: int, pause_s: float, fail_at: int | None = None):
        self.name, self.steps, self.pause_s, self.fail_at = name, steps, pause_s, fail_at
        self.closed_early = False

    async def stream(self):
        try:
            for step in range(self.steps):
                await asyncio.sleep(self.pause_s)
                if step == self.fail_at:
                    raise RuntimeError(f"{self.name} failed")
                yield Chunk(self.name, [step], str(step), "length" if step == self.steps - 1 else None)
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_early = True
            raise


def test_interleaved_yields_every_chunk_as_it_comes_with_its_index():
    fast, slow = Sequence("fast", 3, 0.01), Sequence("slow", 2, 0.05)

    async def run():
        return [(i, c.token_ids[0]) async for i, c in interleaved([fast.stream(), slow.stream()])]

    got = asyncio.run(run())
    assert got[:3] == [(0, 0), (0, 1), (0, 2)] and sorted(got) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_one_failing_sequence_ends_the_others():
    ok, bad = Sequence("ok", 100, 0.01), Sequence("bad", 5, 0.01, fail_at=2)

    async def whole(stream):
        return [chunk async for chunk in stream]

    async def run():
        streams = [ok.stream(), bad.stream()]
        try:
            await all_or_none(whole(stream) for stream in streams)
        finally:
            await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)

    with pytest.raises(RuntimeError, match="bad failed"):
        asyncio.run(run())
    assert ok.closed_early


def test_closing_interleaved_early_cancels_the_reads_in_flight():
    first, second = Sequence("a", 100, 0.01), Sequence("b", 100, 0.01)

    async def run():
        streams = [first.stream(), second.stream()]
        async with contextlib.aclosing(interleaved(streams)) as chunks:
            async for index, _ in chunks:
                if index == 1:
                    break
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)

    asyncio.run(run())
    assert first.closed_early and second.closed_early
