"""The whole service on the simulated engine: the same deployments, router, index and placement, no model.

The simulated engine's greedy output is a function of the prompt (engine/sim/tokens.py), so every reply
is checkable; its cache events go through the same index, so placement finds what it cached.
"""

from __future__ import annotations

import json
import time

import pytest
from service_client import prompt, service_config

from engine.sim.tokens import output_token, prompt_key
from pdserve.up import start

pytestmark = pytest.mark.service

REPLICAS = 3


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    # A loose load bound, as in test_service.py: the default (1.3x the fair share of recent placements) spreads
    # one prefix sent again and again over the replicas on purpose.
    overrides = {
        "service.mode": "colocated", "service.decode.num_replicas": REPLICAS, "engine.kind": "simulated",
        "engine.num_kv_blocks": 256, "router.placement.load_bound": 3.0,
    }  # fmt: skip
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    yield running
    running.stop()


def simulated_greedy(model_dir, ids: list[int], n: int) -> list[int]:
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return [output_token(prompt_key(ids), position, 0, vocab) for position in range(n)]


def test_every_replica_reports_in_and_greedy_output_is_the_simulators_over_grpc_and_http(client, model_dir):
    deadline = time.monotonic() + 30
    while len([w for w in client.status().workers if w.role == "decode"]) < REPLICAS:
        assert time.monotonic() < deadline, client.status().workers
        time.sleep(0.2)
    ids = prompt(90, 3)
    tokens, _, last = client.greedy(ids, 12)
    assert tokens == simulated_greedy(model_dir, ids, 12) and last.finish_reason == "length"
    status, reply = client.post("/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0,
                                                    "ignore_eos": True})  # fmt: skip
    assert status == 200 and reply["usage"]["completion_tokens"] == 12


def test_a_long_prompt_sent_again_lands_on_the_replica_that_cached_it(client):
    ids = prompt(300, 11)
    _, _, first = client.greedy(ids, 4)
    holder = first.timing.decode_worker
    deadline = time.monotonic() + 10
    while next((w.cached_blocks for w in client.status().workers if w.worker_id == holder), 0) < 300 // 32:
        assert time.monotonic() < deadline, "the holder's blocks never reached the index"
        time.sleep(0.1)
    for suffix in range(3):
        _, _, again = client.greedy(ids + [5 + suffix], 4)
        assert again.timing.decode_worker == holder
        assert again.usage.cached_prompt_tokens == 288  # nine full blocks of 32, found in the holder's cache
