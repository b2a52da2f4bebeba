"""The worker pools as Ray Serve deployment handles, each call pinned to the replica placement chose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.types import DecodeJob, OutputDelta, PrefillJob, PrefillResult


class ServeWorkerPools:
    def __init__(self, prefill_handle, decode_handle):
        self._prefill = prefill_handle  # None in co-located mode
        self._decode = decode_handle

    async def prefill(self, worker_id: str, job: PrefillJob) -> AsyncIterator[PrefillResult]:
        stream = self._prefill.options(stream=True).prefill.remote(job, worker_id=worker_id)
        done = False
        try:
            async for result in stream:
                done = result.finished
                yield result
        finally:
            if not done:
                stream.cancel()  # the worker aborts the prefill; an abandoned one must not hold blocks

    async def decode(self, worker_id: str, job: DecodeJob) -> AsyncIterator[OutputDelta]:
        stream = self._decode.options(stream=True).generate.remote(job, worker_id=worker_id)
        done = False
        try:
            async for delta in stream:
                done = delta.finished
                yield delta
        finally:
            if not done:
                stream.cancel()

    async def abort_transfer(self, worker_id: str, handle: str, timeout_s: float) -> None:
        await asyncio.wait_for(_result(self._prefill.abort_transfer.remote(handle, worker_id=worker_id)), timeout_s)

    async def transfer_stats(self, worker_id: str, timeout_s: float) -> dict[str, dict[str, float]]:
        return await asyncio.wait_for(_result(self._decode.transfer_stats.remote(worker_id=worker_id)), timeout_s)


async def _result(response):
    return await response
