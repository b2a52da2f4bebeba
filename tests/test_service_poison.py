"""Co-located mode on the default dtype, two replicas, and a query of death (issue #17).

The workers are started with ``service.test_die_on_token``: a prompt holding that
token id makes the worker kill its own process (SIGKILL), as vLLM's SIGILL did.
Such a request is retried once on another worker, then fails with a clear error;
the other requests in flight complete, and the pool serves again once Serve has
replaced the dead replicas.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from faults import bound_cores, engine_workers, live_workers
from service_client import prompt
from short_prompts import ask_every_short_prompt, defaults_config, replica_ids

from pdserve.models import resolve_model
from pdserve.up import start

pytestmark = pytest.mark.service

POISON = 1010  # a token id no other test prompt holds (prompt() draws from 2..1001)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    overrides = {"service.mode": "colocated", "service.decode.num_replicas": 2, "service.test_die_on_token": POISON}
    running = start(defaults_config(tmp_path_factory.mktemp("cache"), **overrides))
    yield running
    running.stop()


def test_colocated_prompts_of_1_to_4_tokens_are_answered_with_no_replica_restarted(client, service):
    before = replica_ids(client)
    assert len(before) == 2
    assert ask_every_short_prompt(client, resolve_model(service.config).engine.model) == []
    assert replica_ids(client) == before


def test_two_replicas_on_two_cores_bind_one_core_each(service, client):
    """2 engines, 2 cores: too few to keep one back, so none is reserved and each engine has its own."""
    cores = [bound_cores(pid) for replica in live_workers(client, "decode")
             for pid in engine_workers(service, "DecodeWorker", replica)]  # fmt: skip
    assert len(cores) == 2 and all(len(c) == 1 for c in cores) and cores[0].isdisjoint(cores[1])


def test_a_request_that_kills_its_worker_is_retried_once_then_fails_and_the_others_complete(client):
    first = live_workers(client, "decode")
    assert len(first) == 2
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(client.greedy, prompt(24, 60 + i), 1500) for i in range(4)]
        _wait_running(client, 4)
        status, answer = client.post("/v1/completions", {"prompt": [5, POISON, 6], "max_tokens": 4}, timeout=300)
        assert status == 500, answer
        message = answer["error"]["message"]
        assert answer["error"]["type"] == "worker_crash" and "died 2 times" in message, message
        assert all(worker in message for worker in first), message  # both deaths named, each its worker
        for other in others:  # on the dead replicas too: moved on, waited for a replacement where none was left
            tokens, _, last = other.result(300)
            assert len(tokens) == 1500 and last.finish_reason == "length"
    assert client.metric("pdserve:worker_deaths_total", pool="decode") == 2
    assert client.metric("pdserve:poison_requests_total") == 1
    tokens, _, _ = client.greedy(prompt(30, 90), 8)  # the pool serves again, on the replacements
    assert len(tokens) == 8 and not first & live_workers(client, "decode")


def _wait_running(client, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(w.running_seqs for w in client.status().workers) < count:
        assert time.monotonic() < deadline, "the requests never all started decoding"
        time.sleep(0.05)
