"""Serve's request routing carries out placement: a call pinned to a replica runs on that replica."""

from __future__ import annotations

import asyncio

import pytest
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from router.replica_routing import ROUTER_CLASS, pinned_call


@serve.deployment(num_replicas=3, max_ongoing_requests=2,
                  request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS))  # fmt: skip
class Pinned:
    async def whoami(self, delay_s: float, worker_id: str | None = None) -> str:
        await asyncio.sleep(delay_s)
        return serve.get_replica_context().replica_id.unique_id


@serve.deployment
class Caller:
    def __init__(self, pinned):
        self._pinned = pinned

    async def burst(self, targets: list[str]) -> list[str]:
        """Many concurrent calls made in one request, more than the replicas take at once, each pinned."""
        calls = [pinned_call(self._pinned.whoami, 0.05, worker_id=target) for target in targets]
        return list(await asyncio.gather(*calls))


@pytest.fixture(scope="module")
def caller():
    ray.init(num_cpus=4, include_dashboard=False)
    handle = serve.run(Caller.bind(Pinned.bind()), name="pinning", route_prefix=None)
    yield handle
    serve.shutdown()
    ray.shutdown()


def test_concurrent_calls_each_run_on_the_replica_they_are_pinned_to(caller):
    prefix = "SERVE_REPLICA::pinning#Pinned#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    replicas = sorted(name.removeprefix(prefix) for name in names)
    assert len(replicas) == 3
    targets = [replicas[i % 3] if i % 4 else replicas[0] for i in range(48)]  # queueing on one replica most
    assert caller.burst.remote(targets).result(timeout_s=120) == targets
