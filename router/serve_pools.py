"""The worker pools as Ray Serve deployment handles, each call pinned to the replica placement chose.

Ray's errors for a replica whose process died or cannot be reached become
``WorkerGoneError``, so the service can tell a lost worker (retry elsewhere)
from a failed request.

The calls go to the replicas by value, over Serve's inter-deployment gRPC, not as
Ray actor calls whose every streamed item is an object in Ray's store: a token
through the decode replica and the router then costs ~2.2 ms of CPU instead of
~3.6 (Ray 2.60; measured with the ``bench vllm`` random workload, disaggregated,
on 2 cores, where that CPU is taken from the prefill engine's core). Serve turns
this on with ``RAY_SERVE_USE_GRPC_BY_DEFAULT`` for a whole process; here it is
the handle option of that name, ``_by_reference=False``, for these calls only.
A replica's gRPC server caps what it receives at 4 MiB
(``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``): a job's prompt ids and block
hashes stay far under it at any context length vLLM serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from ray.exceptions import ActorUnavailableError, RayActorError

from engine.errors import EngineDeadError, EngineInputError
from engine.types import DecodeJob, OutputDelta, PrefillJob, PrefillResult
from router.left_replicas import LeftReplicas
from router.replica_routing import pinned_call
from router.request import RequestError
from router.service import WorkerGoneError

# The replica's process died or its call broke (Ray's errors; gRPC's where Serve passes them on as they are),
# or its engine's processes died (the replica lives on, unhealthy). A worker's own errors come back as
# themselves, never as a gRPC error.
_GONE = (RayActorError, ActorUnavailableError, grpc.aio.AioRpcError, EngineDeadError)


class ServeWorkerPools:
    def __init__(self, prefill_handle, decode_handle):
        self._prefill = prefill_handle and prefill_handle.options(_by_reference=False)  # None in co-located mode
        self._decode = decode_handle.options(_by_reference=False)

    def prefill(self, worker_id: str, job: PrefillJob) -> AsyncIterator[PrefillResult]:
        return _pinned_stream(self._prefill.options(stream=True).prefill, job, worker_id)

    def decode(self, worker_id: str, job: DecodeJob) -> AsyncIterator[OutputDelta]:
        return _pinned_stream(self._decode.options(stream=True).generate, job, worker_id)

    async def abort_transfer(self, worker_id: str, transfer_id: str, timeout_s: float) -> None:
        call = pinned_call(self._prefill.abort_transfer, transfer_id, worker_id=worker_id)
        await asyncio.wait_for(_result(call), timeout_s)

    async def transfer_stats(self, role: str, worker_id: str, timeout_s: float) -> dict[str, dict]:
        deployment = self._decode if role == "decode" else self._prefill
        return await asyncio.wait_for(_result(pinned_call(deployment.transfer_stats, worker_id=worker_id)), timeout_s)

    def leaving(self) -> dict[str, float]:
        return LeftReplicas.since()


async def _pinned_stream(method, job, worker_id: str):
    """A worker's stream; left before its ``finished`` item, the call is cancelled and the worker frees its KV."""
    stream = pinned_call(method, job, worker_id=worker_id)
    done = False
    try:
        async for item in stream:
            done = item.finished
            yield item
    except _GONE as exc:
        raise WorkerGoneError(worker_id, type(exc).__name__) from exc
    except EngineInputError as exc:  # the worker's vLLM refused what the router let through (a bad grammar)
        raise RequestError(exc.field, exc.message) from exc
    finally:
        if not done:
            stream.cancel()


async def _result(response):
    """A Serve response as a coroutine, so ``asyncio.wait_for`` can bound it."""
    return await response
