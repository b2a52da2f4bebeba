"""A request's several sequences (``n`` copies, a batch of prompts) read as one: all or none, or as they come.

Each sequence is a stream of the service's own; a failure of one ends the others (a cancelled read closes
its stream, which ends its request everywhere), so no copy decodes on for a response that cannot be sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from router.service import Chunk


async def all_or_none(coroutines: Iterable) -> list:
    """Every coroutine's result, in order, or the first failure with the others cancelled."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # none when all are done; on a failure (or our own cancellation) the rest
        await asyncio.gather(*tasks, return_exceptions=True)
    failure = next((task.exception() for task in tasks if not task.cancelled() and task.exception()), None)
    if failure is not None:
        raise failure
    return [task.result() for task in tasks]


async def interleaved(
    streams: list[AsyncIterator[Chunk]], firsts: list[Chunk] | None = None
) -> AsyncIterator[tuple[int, Chunk]]:
    """Every sequence's chunks as they come, each with its sequence's index, until every one has finished;
    ``firsts``: each stream's first chunk, already read. Close it (``contextlib.aclosing``) to stop early:
    the reads in flight are cancelled."""
    pending: dict[asyncio.Future, int] = {}
    ready = list(enumerate(firsts)) if firsts is not None else []
    if firsts is None:
        pending = {asyncio.ensure_future(anext(stream)): index for index, stream in enumerate(streams)}
    try:
        while True:
            for index, chunk in ready:
                yield index, chunk
                if chunk.finish_reason is None:
                    pending[asyncio.ensure_future(anext(streams[index]))] = index
            if not pending:
                return
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            ready = [(pending.pop(future), future) for future in sorted(done, key=pending.get)]
            ready = [(index, future.result()) for index, future in ready if not _ended(future)]
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _ended(read: asyncio.Future) -> bool:
    """A stream that ended without a finishing chunk (its request was closed elsewhere)."""
    return read.exception() is not None and isinstance(read.exception(), StopAsyncIteration)
