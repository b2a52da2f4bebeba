"""The service as a user first starts it: `pdserve up`'s defaults (disaggregated, the embedded tiny model,
``dtype: auto`` = bfloat16 here, compiled (vLLM's default), one prefill and one decode replica, the default core
layout). Issue #17: short prompts, parser-breaking bodies, and the only decode replica dying."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from faults import bound_cores, engine_workers, kill_replica, live_workers, replica_pid, wait_for_replacement
from service_client import prompt, sse_data
from short_prompts import ask_every_short_prompt, defaults_config, replica_ids

from engine.process_priority import can_lower_niceness
from pdserve.models import resolve_model
from pdserve.up import start

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    config = defaults_config(tmp_path_factory.mktemp("cache"))
    assert config.service.mode == "disaggregated"
    running = start(config)
    yield running
    running.stop()


def test_prompts_of_1_to_4_tokens_are_answered_on_the_defaults_with_no_replica_restarted(client, service):
    before = replica_ids(client)
    assert len(before) == 2
    failures = ask_every_short_prompt(client, resolve_model(service.config).engine.model)
    assert failures == []
    assert replica_ids(client) == before


PARSER_BREAKING_BODIES = {
    "nested 100,000 deep": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "object nested 100,000 deep": b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    "an integer of 5,000 digits": b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
    "a lone surrogate": b'{"prompt": "\\ud800 hi"}',
    "a byte-order mark": b'\xef\xbb\xbf{"prompt": "hi"}',
    "not UTF-8": b'{"prompt": "\xff\xfe"}',
    "empty": b"",
    "a JSON array": b'[{"prompt": "hi"}]',
    "truncated": b'{"prompt": "hi", "max_tokens": ',
}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bodies_that_break_the_parser_answer_400_in_openais_error_shape(client, path):
    for name, body in PARSER_BREAKING_BODIES.items():
        if path.endswith("chat/completions"):
            body = body.replace(b'"prompt"', b'"messages": [{"role": "user", "content": "x"}], "stop"')
        status, answer = client.post_raw(path, body, timeout=30)
        assert status == 400, (name, status, answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400, (name, answer)
    status, _ = client.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200


def test_requests_wait_for_the_replacement_when_the_only_decode_replica_dies(client, service):
    (victim,) = live_workers(client, "decode")
    streamed: list = []
    in_flight = ThreadPoolExecutor(1).submit(client.greedy_into, prompt(30, 7), 3000, streamed)
    # A constrained stream is not moved once begun (another worker's grammar would start over): it ends with an
    # error event and [DONE], while the plain stream beside it carries on on the replacement.
    letters = {"structured_outputs": {"regex": "[a-z ]{1,5000}"}, "ignore_eos": True, "max_tokens": 3000}
    constrained = client.open_stream({"prompt": prompt(30, 9), "temperature": 0, **letters})
    events: list[bytes] = []
    reader = threading.Thread(target=sse_data, args=(constrained, events))
    reader.start()
    # Killed once tokens have come back: a request that has streamed nothing is sent again, not moved.
    deadline = time.monotonic() + 60
    while not any(reply.token_ids for reply in list(streamed)) or len(events) < 3:
        assert time.monotonic() < deadline and not in_flight.done(), "the requests never started streaming"
        time.sleep(0.05)
    killed_at = kill_replica(service, "DecodeWorker", victim)
    results, errors = [], []

    def ask(i: int) -> None:
        try:
            tokens, _, last = client.greedy(prompt(20, 40 + i), 6)
            results.append((len(tokens), time.monotonic() - killed_at))
        except Exception as exc:
            errors.append(repr(exc))

    arrivals = []
    for i in range(5):  # one every 2 s over the 10 s after the kill
        arrivals.append(threading.Thread(target=ask, args=(i,)))
        arrivals[-1].start()
        time.sleep(2)
    status, health = client.get("/health")
    assert status == 503 or json.loads(health)["degraded"].get("decode"), (status, health)
    for thread in arrivals:
        thread.join(180)
    assert errors == [] and sorted(n for n, _ in results) == [6] * 5
    in_flight.result(180)
    tokens = [t for reply in streamed for t in reply.token_ids]
    assert len(tokens) == 3000 and streamed[-1].timing.migrations == 1
    reader.join(60)
    constrained.close()
    assert events[-1] == b"[DONE]" and "not moved" in json.loads(events[-2])["error"]["message"]
    wait_for_replacement(client, "decode", 1, victim)
    assert client.metric("pdserve:worker_deaths_total", pool="decode") == 1
    status, health = client.get("/health")
    assert status == 200 and json.loads(health)["status"] == "ok"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) > 2, reason="the layout reserves no core only on a 2-core node")
@pytest.mark.skipif(not can_lower_niceness(), reason="without CAP_SYS_NICE no engine is ever lowered")
def test_with_engines_on_every_core_prefill_stays_with_the_serving_processes_and_decode_runs_ahead(client, service):
    for role, deployment in (("prefill", "PrefillWorker"), ("decode", "DecodeWorker")):
        (replica,) = live_workers(client, role)
        replica_niceness = os.getpriority(os.PRIO_PROCESS, replica_pid(service, deployment, replica))
        workers = engine_workers(service, deployment, replica)
        assert replica_niceness > 0 and workers, role
        for worker in workers:
            threads = os.listdir(f"/proc/{worker}/task")
            expected = replica_niceness if role == "prefill" else 0
            assert {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in threads} == {expected}, role


@pytest.mark.skipif(len(os.sched_getaffinity(0)) > 2, reason="the layout reserves no core only on a 2-core node")
@pytest.mark.skipif(not can_lower_niceness(), reason="without CAP_SYS_NICE no engine is ever lowered")
def test_the_decode_engine_core_sits_on_its_ranks_core_and_the_prefill_one_stays_free(client, service):
    """The decode ranks run ahead of the serving processes: their engine core, at the replica's niceness, waited
    behind them on the other core (one stream stalled 50-800 ms), so it runs on the ranks' core. The prefill ranks
    run at the replica's niceness, where the pin cost 15-25 % a step: its engine core keeps the replica's cores."""
    for role, deployment in (("prefill", "PrefillWorker"), ("decode", "DecodeWorker")):
        (replica,) = live_workers(client, role)
        ranks = engine_workers(service, deployment, replica)
        rank_cores = set().union(*(bound_cores(rank) for rank in ranks))
        engine_core = psutil.Process(ranks[0]).ppid()
        replica_cores = bound_cores(replica_pid(service, deployment, replica))
        assert rank_cores != replica_cores, role  # the ranks are bound narrower than their replica
        expected = rank_cores if role == "decode" else replica_cores
        assert _thread_cores(engine_core) == {frozenset(expected)}, role


def _thread_cores(pid: int) -> set[frozenset[int]]:
    """The core sets the process's threads may run on (a thread that ended meanwhile left out)."""
    seen = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seen.add(frozenset(bound_cores(pid, int(tid))))
        except FileNotFoundError:
            continue
    return seen
