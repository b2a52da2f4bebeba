"""The puller's side of a lease: renew a transfer on every sender rank while the KV is still wanted.

A prefill worker holds offered blocks for ``lease_s`` and frees them when the lease
runs out, so a dead decode worker cannot pin them. A live one may wait longer than
that before it pulls: queued behind other requests in its engine, or on a slow link.
As vLLM's NIXL connector does with heartbeats, the decode worker renews the lease
from the moment it accepts the request until its KV is in (its first token) or the
request ends; a request it gives up before then aborts the transfer, so the prefill
side frees the blocks at once instead of one lease later.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from kv_transfer.channel import GrpcKVChannel
from kv_transfer.errors import TransferError, TransferNotFound
from kv_transfer.transfer import TransferHandle

log = logging.getLogger(__name__)

_MIN_INTERVAL_S = 0.05


class LeaseKeeper:
    """Renews ``handle`` on each of its sender ranks every third of the lease it has left."""

    def __init__(
        self, channel: GrpcKVChannel, handle: TransferHandle, lease_s: float, calls: Executor, call_timeout_s=5.0
    ):
        self._channel = channel
        self._handle = handle
        self._lease_s = lease_s  # the prefill workers' (one transfer config for the service)
        self._calls = calls  # the blocking gRPC calls run here, not in the event loop's default executor
        self._call_timeout_s = call_timeout_s
        self._done = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.renewals = 0

    def start(self) -> LeaseKeeper:
        self._task = asyncio.get_running_loop().create_task(self._renew())
        return self

    async def stop(self, abort: bool = False) -> None:
        """Stop renewing at once (a renewal in flight ends on its own deadline); ``abort``: the KV will not be
        pulled, so every sender rank frees it now."""
        self._done.set()
        if self._task is not None:
            self._task.cancel()
        if abort:
            await asyncio.gather(*(self._call("abort", rank) for rank in range(len(self._handle.ranks))))

    async def _renew(self) -> None:
        """First a third of a lease after the start (most requests have their KV by then: no call at all), then
        every third of what the senders report left; a rank with nothing offered yet has a whole lease ahead."""
        interval = self._lease_s / 3
        while not await self._stopped_within(interval):
            statuses = await asyncio.gather(*(self._call("renew", rank) for rank in range(len(self._handle.ranks))))
            if all(s is not None and s.state.final for s in statuses):
                return  # released, aborted or expired on every rank: nothing left to keep
            left = [s.lease_remaining_s for s in statuses if s is not None and not s.state.final]
            self.renewals += bool(left)
            interval = max(_MIN_INTERVAL_S, min(left, default=self._lease_s) / 3)

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._done.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _call(self, method: str, rank: int):
        """One control call to one sender rank; None where it failed (not offered yet, or unreachable)."""
        call = getattr(self._channel, method)
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._calls, call, self._handle, self._call_timeout_s, rank)
        except TransferNotFound:
            return None  # not offered yet (its prefill is queued), or already finished
        except TransferError as exc:
            log.info("%s of %s on sender rank %d failed: %s", method, self._handle.transfer_id, rank, exc)
            return None
