"""The decode worker as a Ray Serve deployment: one vLLM engine with pdserve's connector as consumer.

With a transfer handle, vLLM counts its own prefix hit first and the
connector pulls only the blocks it lacks; without one (local prefill, or
co-located mode), the same engine prefills the prompt itself. A failed pull
means a local recompute inside vLLM: the request completes either way.
Closing the stream (the client went away) aborts the request and frees its KV.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import replace

from ray import serve

from engine.config import EngineConfig
from engine.hosting import HostedWorker, WorkerSettings
from engine.types import DecodeJob, OutputDelta
from kv_transfer.vllm_connector import PULLED_TOKENS_KEY, TOKEN_ENV


@serve.deployment(name="DecodeWorker", health_check_period_s=5, health_check_timeout_s=10)
class DecodeWorker(HostedWorker):
    def __init__(self, engine_config: EngineConfig, settings: WorkerSettings):
        os.environ[TOKEN_ENV] = settings.cluster_token.get_secret_value()  # the connector vLLM builds reads it here
        self._start(engine_config, "decode", serve.get_replica_context().replica_id.unique_id, settings)

    async def generate(self, job: DecodeJob, worker_id: str | None = None) -> AsyncIterator[OutputDelta]:
        params = None
        if job.handle is not None:
            params = {"pdserve": "consume", "handle": job.handle, "block_hashes": job.block_hashes}
        async for delta in self._host.stream(replace(job.request, kv_transfer_params=params)):
            pulled = (delta.kv_transfer_params or {}).get(PULLED_TOKENS_KEY) if delta.finished else None
            yield delta if pulled is None else replace(delta, kv_pulled_tokens=pulled)
