"""The disaggregated service with a two-rank prefill engine and a one-rank decode engine.

Each prefill rank serves the KV heads it holds; the decode worker gathers them from both ranks.
Greedy output is transformers' (float32, where two ranks and one sum to the same tokens), the KV
came over the wire, nothing failed, and the prefill workers' blocks are back once the requests end.
"""

from __future__ import annotations

import os

import pytest
from helpers import transformers_greedy
from service_client import prompt, service_config

from pdserve.up import start

pytestmark = [
    pytest.mark.service,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two ranks need two cores"),
]


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    overrides = {"service.prefill.engine": {"tensor_parallel_size": 2}}
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides))
    yield running
    running.stop()


def test_a_two_rank_prefill_hands_its_kv_to_a_one_rank_decode_and_the_tokens_are_one_engines(
    service, client, model_dir
):
    prompts = [prompt(150 + 40 * i, 300 + i) for i in range(3)]
    for ids in prompts:
        tokens, _, last = client.greedy(ids, 24)
        assert tokens == transformers_greedy(model_dir, ids, 24)
        assert last.usage.kv_transferred_tokens >= 128  # its prompt's KV came from the prefill ranks
    assert client.metric("pdserve:kv_transfer_bytes_total") > 0
    assert client.metric("pdserve:kv_transfer_failures_total") == 0


def test_every_prefill_rank_frees_its_blocks_once_the_decode_worker_has_its_kv(service, client):
    client.greedy(prompt(200, 400), 4)
    client.wait_idle(10)  # every worker's KV pool empty again: both prefill ranks were released
    assert client.metric("pdserve:kv_leases_expired_total") == 0
