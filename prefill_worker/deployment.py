"""The prefill worker as a Ray Serve deployment: one vLLM engine with pdserve's connector as producer.

A prefill runs the prompt with ``max_tokens=1``; the connector keeps the
prompt's blocks under a lease and returns a transfer handle, which the router
passes to the decode worker. The router addresses a replica by its Serve
replica id (the id the replica heartbeats to the prefix index under), through
pdserve's pinned request router; ``worker_id`` is that routing key.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import replace

import ray
from ray import serve

from engine.config import EngineConfig
from engine.hosting import HostedWorker, WorkerSettings
from engine.types import PrefillJob, PrefillResult
from kv_transfer.handoff import TOKEN_ENV, SenderInfo, transfer_handle


def with_transfer_host(config: EngineConfig) -> EngineConfig:
    """The connector serves its blocks on this node's address, so peers on other nodes can pull."""
    if config.kv_connector is None or "host" in config.kv_connector.extra:
        return config
    extra = {**config.kv_connector.extra, "host": ray.util.get_node_ip_address()}
    return config.model_copy(update={"kv_connector": config.kv_connector.model_copy(update={"extra": extra})})


@serve.deployment(name="PrefillWorker", health_check_period_s=5, health_check_timeout_s=10)
class PrefillWorker(HostedWorker):
    def __init__(self, engine_config: EngineConfig, settings: WorkerSettings):
        os.environ[TOKEN_ENV] = settings.cluster_token.get_secret_value()  # the connector vLLM builds reads it here
        worker_id = serve.get_replica_context().replica_id.unique_id
        self._start(with_transfer_host(engine_config), "prefill", worker_id, settings)
        self._senders = [SenderInfo.from_dict(rank) for rank in self._host.engine.kv_connector_handshake()]
        self._accepted_tokens = 0  # prompt tokens of the prefills accepted here that have not ended

    async def prefill(self, job: PrefillJob, worker_id: str | None = None) -> AsyncIterator[PrefillResult]:
        """Yield the transfer handle up front when the prompt starts at once, then the end; else only the end.

        Up front, as SGLang's bootstrap, the decode side pulls each layer as it is computed instead of
        waiting for the prefill to finish. But the decode side holds the prompt's blocks from then until
        its KV lands, so a prompt queued behind a step's worth of others (``step_token_budget``: it will
        not start in the next step) gives its handle when it ends, as vLLM's disaggregated prefill does:
        a prefill backlog then holds no decode KV, which the decode pool would otherwise scale up for and
        which would keep it from admitting the prompts whose KV is ready.
        """
        params = {"pdserve": "produce", "transfer_id": job.transfer_id, "block_hashes": job.block_hashes}
        one_token = dict(max_tokens=1, min_tokens=0, stop=(), stop_token_ids=(), ignore_eos=True, logprobs=None,
                         structured=None, tool_use=None)  # fmt: skip
        sampling = replace(job.request.sampling, **one_token)  # the decode worker makes every output token
        request = replace(job.request, sampling=sampling, kv_transfer_params=params)
        prompt, engine = len(request.prompt_token_ids), self._host.engine
        ahead = self._accepted_tokens  # read and counted with no await between: concurrent calls see each other
        self._accepted_tokens += prompt
        last = None
        try:
            if ahead < engine.step_token_budget:  # it starts in the next step
                handle = transfer_handle(self._senders, engine.block_size, job.transfer_id, job.block_hashes, prompt)
                yield PrefillResult(handle, finished=False)
            async for delta in self._host.stream(request):
                last = delta
        finally:
            self._accepted_tokens -= prompt
        if last is None:
            yield PrefillResult(None)
            return
        handle = (last.kv_transfer_params or {}).get("pdserve_handle")
        yield PrefillResult(handle, cached_prompt_tokens=last.cached_prompt_tokens)

    async def abort_transfer(self, transfer_id: str, worker_id: str | None = None) -> None:
        """Free a transfer nobody will pull (its request was cancelled between prefill and decode).

        By id, so the router can abort a transfer whose handle it never received: one not offered
        yet is refused when its prefill ends, and its blocks are freed then."""
        await self._host.engine.abort_kv_transfer(transfer_id)
