"""The service with its prefix index in a real Redis, the round-robin policy as the baseline, and decode
migration off (the lost-worker test comes last).

On the simulated engine: what is tested is the index and the router, which cannot tell the engines apart
(test_service_simulated.py); the Redis index under vLLM's own cache events is in test_faults.py, and three
vLLM engine starts here cost CI a minute."""

from __future__ import annotations

import time

import grpc
import pytest
from faults import kill_replica, live_workers
from service_client import ServiceClient, prompt, service_config, simulated_greedy

from pdserve.up import start
from pdserve_pb.v1 import generate_pb2 as pb

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    from pdserve.local_redis import LocalRedis

    redis = LocalRedis(tmp_path_factory.mktemp("redis")).start()
    overrides = {
        "engine.kind": "simulated",
        "service.prefill.num_replicas": 2,
        "router.index.redis_url": redis.url,
        "router.placement.policy": "round_robin",
        "router.recovery.migrate_decode": False,
    }
    try:  # the Redis stops even when the service does not start
        running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
        yield running
        running.stop()
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def client(service):
    c = ServiceClient(service)
    yield c
    c.close()


def test_disaggregated_greedy_output_with_the_redis_index_is_the_engines(client, model_dir):
    ids = prompt(150, 1)
    tokens, _, last = client.greedy(ids)
    assert last.timing.placement == "disaggregated"
    assert tokens == simulated_greedy(model_dir, ids, 12)


def test_workers_heartbeat_into_redis(client):
    status = client.status()
    assert status.index_available
    assert sorted(w.role for w in status.workers) == ["decode", "prefill", "prefill"]


def test_round_robin_spreads_a_shared_prefix_over_the_prefill_replicas(client):
    shared = prompt(160, 20)
    client.greedy(shared + prompt(80, 21), 2)
    time.sleep(1.0)
    hits_before = client.metric("pdserve:prefix_cache_hit_tokens_total", pool="prefill")
    placed = [client.greedy(shared + prompt(80, 22 + i), 2)[2].timing.prefill_worker for i in range(4)]
    assert len(set(placed)) == 2  # prefix_aware sends all four to the holder (test_service.py)
    hits = client.metric("pdserve:prefix_cache_hit_tokens_total", pool="prefill") - hits_before
    assert hits < 4 * 160


def test_with_migration_off_a_lost_decode_worker_ends_its_streams_with_a_clear_error(service, client):
    """Runs last: it kills the module's only decode worker."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt(100, 90)),
                                 sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True))  # fmt: skip
    call = client.stub.Generate(request, timeout=120)
    next(call)
    reply = client.open_stream({"prompt": prompt(100, 91), "max_tokens": 900, "ignore_eos": True}).getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    (victim,) = live_workers(client, "decode")
    killed_at = kill_replica(service, "DecodeWorker", victim)
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and victim in error.value.details()
    events = [line for line in reply.read().split(b"\n") if line.startswith(b"data: ")]
    assert b'"type":"service_unavailable"' in events[-2] and victim.encode() in events[-2]
    assert events[-1] == b"data: [DONE]"  # after the error event, as vLLM's server ends a stream
    assert time.monotonic() - killed_at < 10
