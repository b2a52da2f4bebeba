"""The decode worker as a Ray Serve deployment: one vLLM engine with pdserve's connector as consumer.

With a transfer handle, vLLM counts its own prefix hit first and the
connector pulls only the blocks it lacks; without one (local prefill, or
co-located mode), the same engine prefills the prompt itself. A failed pull
means a local recompute inside vLLM: the request completes either way.
Until the KV is in (the first token), the worker renews the transfer's lease
on every prefill rank (``LeaseKeeper``), however long the request queues. Then,
and for a request refused or cancelled before then, it aborts the transfer:
an offer already released stays so, and one nobody pulled (a local prefix hit
covered the prompt, the handle was refused) is freed at once, not a lease
later. Closing the stream (the client went away) aborts the request and frees
its KV.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from google.protobuf.message import DecodeError
from ray import serve

from engine.config import EngineConfig
from engine.hosting import HostedWorker, WorkerSettings
from engine.types import DecodeJob, OutputDelta
from kv_transfer.channel import GrpcKVChannel
from kv_transfer.errors import TransferError
from kv_transfer.handoff import DEFAULT_LEASE_S, PULLED_TOKENS_KEY, TOKEN_ENV, kv_tls
from kv_transfer.lease_keeper import LeaseKeeper
from kv_transfer.transfer import TransferHandle


@serve.deployment(name="DecodeWorker", health_check_period_s=5, health_check_timeout_s=10)
class DecodeWorker(HostedWorker):
    def __init__(self, engine_config: EngineConfig, settings: WorkerSettings):
        os.environ[TOKEN_ENV] = settings.cluster_token.get_secret_value()  # the connector vLLM builds reads it here
        tls = kv_tls(engine_config.kv_connector.extra) if engine_config.kv_connector else None
        # lease renewals and aborts, to the prefill workers' KV servers
        self._kv_control = GrpcKVChannel(settings.cluster_token.get_secret_value(), tls_root_certificate=tls and tls.ca)
        self._background: set[asyncio.Task] = set()
        self._lease_calls = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pdserve-kv-lease")
        extra = engine_config.kv_connector.extra if engine_config.kv_connector else {}
        self._lease_s = float(extra.get("lease_s", DEFAULT_LEASE_S))  # the service's, as the prefill workers
        self._start(engine_config, "decode", serve.get_replica_context().replica_id.unique_id, settings)

    async def generate(self, job: DecodeJob, worker_id: str | None = None) -> AsyncIterator[OutputDelta]:
        params = keeper = None
        if job.handle is not None:
            params = {"pdserve": "consume", "handle": job.handle, "block_hashes": job.block_hashes}
            keeper = self._keep_lease(job.handle)
        try:
            async for delta in self._host.stream(replace(job.request, kv_transfer_params=params)):
                if keeper is not None:  # the first token: every rank's pull has ended (or none was needed)
                    self._in_background(keeper.stop(abort=True))  # whatever was not pulled never will be
                    keeper = None
                pulled = (delta.kv_transfer_params or {}).get(PULLED_TOKENS_KEY) if delta.finished else None
                yield delta if pulled is None else replace(delta, kv_pulled_tokens=pulled)
        finally:
            if keeper is not None:  # refused, failed or cancelled before its KV came: free the prefill's blocks
                await keeper.stop(abort=True)

    def _in_background(self, work: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)

    def _keep_lease(self, handle_hex: str) -> LeaseKeeper | None:
        try:
            handle = TransferHandle.from_bytes(bytes.fromhex(handle_hex))
        except (ValueError, DecodeError, TransferError):
            return None  # the connector refuses it and the request prefills locally
        return LeaseKeeper(self._kv_control, handle, self._lease_s, self._lease_calls).start()
