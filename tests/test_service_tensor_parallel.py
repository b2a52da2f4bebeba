"""The service on a tensor-parallel engine: two ranks, each in its own vLLM worker process on its own core.

SIGKILL of one rank's process under load: vLLM's engine core sees its worker die and fails its
requests; the replica's requests move on (here: wait for Serve's replacement, the pool's only
replica) and finish with the tokens a healthy engine gives. Nothing is lost.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from faults import bound_cores, engine_workers, live_workers, wait_for_replacement
from helpers import transformers_greedy
from service_client import prompt, service_config

from pdserve.up import start

pytestmark = [
    pytest.mark.service,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two ranks need two cores"),
]


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    # One replica: a request whose rank was killed waits for its replacement, which here comes ~75 s after the
    # kill (vLLM notices the dead rank in ~10 s, Serve's health checks take ~13 s, a TP=2 engine starts in ~50 s
    # on two busy cores), past the default 60 s wait.
    overrides = {"service.mode": "colocated", "engine.tensor_parallel_size": 2,
                 "router.recovery.wait_for_worker_s": 180}  # fmt: skip
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides))
    yield running
    running.stop()


def test_each_rank_runs_in_its_own_process_on_its_own_core(service, client):
    (replica,) = live_workers(client, "decode")
    workers = engine_workers(service, "DecodeWorker", replica)
    assert len(workers) == 2
    cores = [bound_cores(pid) for pid in workers]
    assert all(len(c) == 1 for c in cores) and cores[0].isdisjoint(cores[1])


def test_sigkill_of_one_rank_under_load_loses_no_request_and_changes_no_token(service, client, model_dir):
    prompts = [prompt(40 + 10 * i, 70 + i) for i in range(3)]
    expected = [transformers_greedy(model_dir, ids, 60) for ids in prompts]
    (replica,) = live_workers(client, "decode")
    one_rank = engine_workers(service, "DecodeWorker", replica)[-1]
    streamed: list[list] = [[] for _ in prompts]
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(client.greedy_into, ids, 60, into) for ids, into in zip(prompts, streamed, strict=True)]
        deadline = time.monotonic() + 60
        # Killed once a stream has tokens: one that has streamed nothing is sent again, not moved.
        while not any(reply.token_ids for replies in streamed for reply in list(replies)):
            assert time.monotonic() < deadline, "the load never started streaming"
            time.sleep(0.05)
        os.kill(one_rank, signal.SIGKILL)
        for future in running:
            future.result(300)
    assert [[t for reply in replies for t in reply.token_ids] for replies in streamed] == expected
    assert any(replies[-1].timing.migrations for replies in streamed)  # those in flight moved on
    wait_for_replacement(client, "decode", 1, replica)
