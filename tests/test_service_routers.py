"""Two router replicas over one Redis index: the same placements whichever router takes a request.

Each router replica runs its own gRPC listener on the shared port (SO_REUSEPORT),
so every new connection lands on one of them; a channel with its own subchannel
pool is one connection, hence one router for its whole life.

On the simulated engine (what is tested is the router tier; its decode steps are slowed to 20 ms, so a
600-token stream is still running when its router is killed).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers import wait_for
from service_client import prompt, service_config

from pdserve.up import start
from pdserve_pb.v1 import generate_pb2 as pb
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.service

LOAD_BOUND = 1.3  # the default: the burst test checks the bound itself
PROFILE = {"name": "routers-test", "source": "tests: streams that outlast a router kill", "base_ms": 20.0,
           "prefill_ms_per_token": 0.05, "prefill_ms_per_token2": 0.0, "decode_ms_per_seq": 0.0,
           "decode_ms_per_context_token": 0.0, "kv_bytes_per_token": 1, "link_bytes_per_s": 1e9}  # fmt: skip


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    from pdserve.local_redis import LocalRedis

    redis = LocalRedis(tmp_path_factory.mktemp("redis")).start()
    profile = tmp_path_factory.mktemp("profile") / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    overrides = {
        "engine.kind": "simulated",
        "engine.simulated_profile": str(profile),
        "engine.num_kv_blocks": 512,
        "service.router.num_replicas": 2,
        "service.prefill.num_replicas": 2,
        "router.index.redis_url": redis.url,
        "router.placement.load_bound": LOAD_BOUND,
    }
    try:  # the Redis stops even when the service does not start
        running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
        yield running
        running.stop()
    finally:
        redis.stop()


class Connection:
    """One TCP connection to the gRPC port, hence one router replica."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.GenerationStub(self.channel)

    def stream(self, ids: list[int], max_tokens: int, timeout: float = 120):
        sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling)
        return self.stub.Generate(request, timeout=timeout)

    def generate(self, ids: list[int], max_tokens: int, timeout: float = 120) -> pb.GenerateResponse:
        return list(self.stream(ids, max_tokens, timeout))[-1]

    def router(self) -> str:
        return self.generate(prompt(8, 999), 1).timing.router

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def connections(service):
    """Connections that between them reach both router replicas, by router."""
    by_router: dict[str, list[Connection]] = {}
    opened = []
    for _ in range(40):
        connection = Connection(service.grpc_address)
        opened.append(connection)
        by_router.setdefault(connection.router(), []).append(connection)
        if len(by_router) == 2 and min(len(c) for c in by_router.values()) >= 2:
            break
    assert len(by_router) == 2, f"40 connections all reached one router: {list(by_router)}"
    assert min(len(c) for c in by_router.values()) >= 2, f"too few connections to one router: {by_router}"
    yield by_router
    for connection in opened:
        connection.close()


def test_a_shared_prefix_lands_on_its_holder_whichever_router_takes_it(connections):
    shared = prompt(160, 40)
    first = next(iter(connections.values()))[0].generate(shared + prompt(80, 41), 2)
    holder = first.timing.prefill_worker
    assert holder and first.timing.placement == "disaggregated"
    placed = []
    for number, connection in enumerate(c for group in connections.values() for c in group[:2]):
        time.sleep(0.3)  # a heartbeat passes: the holder's load reads settled (test_service.py's affinity test)
        last = connection.generate(shared + prompt(80, 42 + number), 2)
        placed.append((last.timing.router, last.timing.prefill_worker))
    assert {router for router, _ in placed} == set(connections)
    assert [worker for _, worker in placed] == [holder] * len(placed)


def test_a_burst_on_one_prefix_through_both_routers_is_spread_by_their_shared_in_flight_load(connections):
    shared = prompt(160, 60)
    holder = next(iter(connections.values()))[0].generate(shared + prompt(80, 61), 2).timing.prefill_worker
    time.sleep(0.5)
    burst = [c for group in connections.values() for c in group[:2]] * 2  # 8 at once, 4 through each router
    with ThreadPoolExecutor(len(burst)) as pool:
        lasts = list(pool.map(lambda a: a[1].generate(shared + prompt(400, 62 + a[0]), 4), enumerate(burst)))
    placed = [last.timing.prefill_worker for last in lasts if last.timing.placement == "disaggregated"]
    assert len({last.timing.router for last in lasts}) == 2
    # The holder saves 160 of 560 tokens: with every router's queued tokens in view, it is not worth a queue.
    assert 1 <= placed.count(holder) <= math.ceil(LOAD_BOUND * len(burst) / 2)
    assert all(last.finish_reason == "length" for last in lasts)


def test_an_abort_or_a_reused_id_reaches_the_router_running_the_request(connections):
    first, second = (group[0] for group in connections.values())
    sampling = pb.SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)
    request = pb.GenerateRequest(request_id="shared-id-1", token_ids=pb.TokenIds(ids=prompt(60, 70)), sampling=sampling)
    stream = first.stub.Generate(request, timeout=60)
    next(stream)  # running on the first router
    with pytest.raises(grpc.RpcError) as reused:
        list(second.stub.Generate(request, timeout=30))
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS and "already running" in reused.value.details()
    assert second.stub.Abort(pb.AbortRequest(request_id="shared-id-1"), timeout=10).found
    assert [r.finish_reason for r in stream if r.finish_reason] == ["abort"]
    wait_for(lambda: not second.stub.Abort(pb.AbortRequest(request_id="shared-id-1"), timeout=10).found)


def test_a_killed_router_replica_fails_only_its_own_requests_and_the_other_serves_on(service, client, connections):
    import ray

    victim, survivor = sorted(connections, key=lambda r: r != next(iter(connections)))
    streams = [c.stream(prompt(120, 80 + i), 600, timeout=60) for i, c in enumerate(connections[victim][:2])]
    streams += [c.stream(prompt(120, 85 + i), 600, timeout=60) for i, c in enumerate(connections[survivor][:2])]
    for stream in streams:
        next(stream)  # every stream has started: its request is in flight
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{service.config.service.app_name}#Router#{victim}", namespace="serve"))

    def outcome(stream):
        try:
            return list(stream)[-1]
        except grpc.RpcError as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(outcome, streams))
    assert [o.code() for o in outcomes[:2]] == [grpc.StatusCode.UNAVAILABLE] * 2, outcomes[:2]
    assert time.monotonic() - killed_at < 30
    assert [(o.finish_reason, o.timing.router) for o in outcomes[2:]] == [("length", survivor)] * 2

    after = [Connection(service.grpc_address) for _ in range(4)]
    try:
        lasts = [c.generate(prompt(60, 90 + i), 4, timeout=60) for i, c in enumerate(after)]
    finally:
        for connection in after:
            connection.close()
    assert all(last.finish_reason == "length" and last.timing.router != victim for last in lasts)
    assert client.status().index_available and len(client.status().workers) == 3
    client.wait_idle(30)

    def replaced() -> bool:  # Serve starts a new router replica in the dead one's place
        connection = Connection(service.grpc_address)
        try:
            return connection.router() not in (victim, survivor)
        finally:
            connection.close()

    wait_for(replaced, 120)
