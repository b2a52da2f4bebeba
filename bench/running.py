"""A pdserve started for one benchmark run (a local Ray cluster, free ports), warmed up, then stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from bench.load import LoadSpec, run_load
from bench.workloads import Turn, Workload
from engine.config import VLLM_ONLY_FIELDS, EngineConfig
from pdserve.config import PdserveConfig, with_settings
from pdserve.local_redis import free_port

T = TypeVar("T")


def on_the_simulated_engine(**engine: object) -> dict:
    """Dotted settings that run a config's service on the simulated engine with these ``engine`` fields, vLLM's
    own settings back at their defaults: a real arm's dtype and the like, which the simulated engine refuses."""
    cleared = {f"engine.{name}": EngineConfig.model_fields[name].default for name in VLLM_ONLY_FIELDS}
    return {**cleared, "engine.kind": "simulated", **{f"engine.{name}": value for name, value in engine.items()}}


def with_service(config: PdserveConfig, overrides: dict, body: Callable[..., T]) -> T:
    """``body(service)`` against a service started from ``config`` plus ``overrides`` (dotted keys; None clears
    a field)."""
    from pdserve.up import start

    settings = {"service.http_port": free_port(), "service.grpc_port": free_port(), **overrides}
    service = start(with_settings(config, settings))
    try:
        warm_up = Workload("warm-up", [[Turn([7] * 64, 2)]])  # the first request pays for lazy imports
        asyncio.run(run_load(service.http_url, service.grpc_address, warm_up, LoadSpec(users=1, progress=False)))
        return body(service)
    finally:
        service.stop()


def load_service(config: PdserveConfig, overrides: dict, workload: Workload, load: LoadSpec):
    """One workload against a service started for it: (records, wall seconds)."""
    return with_service(config, overrides, lambda s: asyncio.run(run_load(s.http_url, s.grpc_address, workload, load)))
