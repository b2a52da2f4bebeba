"""A pdserve started for one benchmark run (a local Ray cluster, free ports), warmed up, then stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from bench.load import LoadSpec, run_load
from bench.workloads import Turn, Workload
from pdserve.config import PdserveConfig, load_config
from pdserve.local_redis import free_port

T = TypeVar("T")


def with_service(config: PdserveConfig, overrides: dict, body: Callable[..., T]) -> T:
    """``body(service)`` against a service started from ``config`` plus ``overrides`` (dotted keys)."""
    from pdserve.up import start

    settings = {"service.http_port": free_port(), "service.grpc_port": free_port(), **overrides}
    service = start(load_config(data=config.model_dump(mode="json"), overrides=settings))
    try:
        warm_up = Workload("warm-up", [[Turn([7] * 64, 2)]])  # the first request pays for lazy imports
        asyncio.run(run_load(service.http_url, service.grpc_address, warm_up, LoadSpec(users=1, progress=False)))
        return body(service)
    finally:
        service.stop()


def load_service(config: PdserveConfig, overrides: dict, workload: Workload, load: LoadSpec):
    """One workload against a service started for it: (records, wall seconds)."""
    return with_service(config, overrides, lambda s: asyncio.run(run_load(s.http_url, s.grpc_address, workload, load)))
