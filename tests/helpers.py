"""Small helpers the tests share."""

from __future__ import annotations

import asyncio


def collect(engine, request):
    """Run one request to completion and return its deltas."""

    async def run():
        return [delta async for delta in engine.generate(request)]

    return asyncio.run(run())
