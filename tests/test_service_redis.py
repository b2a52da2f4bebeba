"""The service with its prefix index in a real Redis, and the round-robin policy as the baseline."""

from __future__ import annotations

import time

import pytest
from helpers import transformers_greedy
from service_client import ServiceClient, prompt, service_config

from pdserve.up import start

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    from pdserve.local_redis import LocalRedis

    redis = LocalRedis(tmp_path_factory.mktemp("redis")).start()
    overrides = {
        "service.prefill.num_replicas": 2,
        "router.index.redis_url": redis.url,
        "router.placement.policy": "round_robin",
    }
    service = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    c = ServiceClient(service)
    yield c
    c.close()
    service.stop()
    redis.stop()


def test_disaggregated_greedy_output_with_the_redis_index_equals_transformers(client, model_dir):
    ids = prompt(150, 1)
    tokens, _, last = client.greedy(ids)
    assert last.timing.placement == "disaggregated"
    assert tokens == transformers_greedy(model_dir, ids, 12)


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
