"""Co-located mode (one pool prefills and decodes, no transfer), with Serve autoscaling on that pool."""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from faults import bound_cores, engine_workers, replica_pid
from helpers import transformers_greedy, transformers_logprobs, whitespace_banned
from service_client import prompt, service_config

from pdserve.up import start

pytestmark = pytest.mark.service

AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 3,
    "look_back_period_s": 0.5,
    "metrics_interval_s": 0.2,
}


@pytest.fixture(scope="module")
def processes_before_the_service() -> set[int]:
    """What this pytest process already ran (multiprocessing's resource tracker from an earlier module): not the
    cluster's."""
    return {process.pid for process in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory, processes_before_the_service):
    overrides = {"service.mode": "colocated", "service.decode.autoscaling_config": AUTOSCALING}
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    yield running
    running.stop()


def decode_workers(client) -> int:
    return sum(w.role == "decode" for w in client.status().workers)


def test_colocated_mode_gives_the_same_tokens_without_a_prefill_pool(client, model_dir):
    ids = prompt(150, 1)
    tokens, _, last = client.greedy(ids)
    assert last.timing.placement == "local_prefill" and client.status().mode == "colocated"
    assert tokens == transformers_greedy(model_dir, ids, 12)
    assert all(w.role == "decode" for w in client.status().workers)


def test_the_engine_binds_a_core_of_its_own_and_leaves_the_reserved_core_to_the_serving_processes(client, service):
    (replica,) = [w.worker_id for w in client.status().workers]
    (worker,) = engine_workers(service, "DecodeWorker", replica)
    assert bound_cores(worker) == set(sorted(os.sched_getaffinity(0))[1:2])  # core 0 stays with Ray, Serve, router


def test_ray_serve_the_replicas_and_the_engine_core_keep_to_the_reserved_core_at_the_ranks_niceness(
    client, service, processes_before_the_service
):
    """Off the core the worker binds, all at one niceness (as vLLM's server runs every process)."""
    (replica,) = [w.worker_id for w in client.status().workers]
    (worker,) = engine_workers(service, "DecodeWorker", replica)
    reserved = set(sorted(os.sched_getaffinity(0))[:1])
    serving = {}  # every process the local cluster started, but the rank worker: pid → (cores, niceness)
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):
            if process.pid not in processes_before_the_service | {worker} and process.name() != "redis-server":
                serving[process.pid] = (frozenset(bound_cores(process.pid)), niceness(process.pid))
    assert psutil.Process(worker).ppid() in serving and replica_pid(service, "DecodeWorker", replica) in serving
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert set(serving.values()) == {(frozenset(reserved), own)}, serving
    assert niceness(worker) == own and not bound_cores(worker) & reserved


def niceness(pid: int) -> int:
    """Every thread's niceness, which must agree (Linux keeps one per thread)."""
    (value,) = {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
    return value


def test_scaling_the_pool_up_and_down_under_load_loses_no_request(client, model_dir):
    prompts = [prompt(80, 100 + i) for i in range(3)]
    expected = [transformers_greedy(model_dir, ids, 48) for ids in prompts]
    seen = {decode_workers(client)}
    submitted = []
    with ThreadPoolExecutor(6) as pool:  # six requests in flight against a target of one per replica
        # Serve decides to scale up within a second; the new replica's engine then starts on the core the busy one
        # runs on: 62 s here under this load (30 s idle), past 90 s on a slower CI run.
        deadline = time.monotonic() + 240
        while 2 not in seen and time.monotonic() < deadline:
            while sum(not f.done() for _, f in submitted) < 6:
                i = len(submitted) % 3
                submitted.append((i, pool.submit(lambda ids: client.greedy(ids, 48)[0], prompts[i])))
            seen.add(decode_workers(client))
            time.sleep(0.2)
        results = [(i, f.result()) for i, f in submitted]
    assert 2 in seen, f"the pool never scaled up (saw {seen})"
    assert all(got == expected[i] for i, got in results), "a request was lost or wrong while scaling up"
    deadline = time.monotonic() + 60
    while decode_workers(client) > 1:
        assert time.monotonic() < deadline, "the pool did not scale back down"
        time.sleep(0.5)
    assert client.greedy(prompts[0], 48)[0] == expected[0]


def test_colocated_mode_answers_what_clients_send_as_the_disaggregated_path_does(client, model_dir):
    """The features of tests/test_service.py's disaggregated service, on the one pool: the same references."""
    ids = prompt(24, 700)
    status, body = client.post("/v1/completions", {"prompt": ids, "max_tokens": 4, "temperature": 0, "logprobs": 2,
                                                   "ignore_eos": True, "n": 2})  # fmt: skip
    tokens = transformers_greedy(model_dir, ids, 4)
    assert status == 200 and body["pdserve"]["choices_token_ids"] == [tokens, tokens]
    reference = transformers_logprobs(model_dir, ids, tokens)
    got = body["choices"][0]["logprobs"]["token_logprobs"]
    assert got == pytest.approx([reference[i][t] for i, t in enumerate(tokens)], abs=1e-3)
    status, batch = client.post("/v1/completions", {"prompt": [ids, prompt(30, 701)], "max_tokens": 3,
                                                    "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert batch["pdserve"]["choices_token_ids"][1] == transformers_greedy(model_dir, prompt(30, 701), 3)
    chat = {"messages": [{"role": "user", "content": "pick"}], "temperature": 0, "max_tokens": 40,
            "tools": [{"type": "function", "function": {"name": "pick", "parameters": {
                "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["n"]}}}],
            "tool_choice": {"type": "function", "function": {"name": "pick"}},
            "logit_bias": {str(t): b for t, b in whitespace_banned(model_dir).items()}}  # fmt: skip
    status, called = client.post("/v1/chat/completions", chat)  # no tool call parser: a named call is JSON
    (call,) = called["choices"][0]["message"]["tool_calls"]
    assert status == 200 and call["function"]["name"] == "pick"
    assert 0 <= json.loads(call["function"]["arguments"])["n"] <= 9
    status, refused = client.post("/v1/chat/completions", {**chat, "tool_choice": "auto"})
    assert status == 400 and refused["error"]["param"] == "tool_choice"
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"enum": ["yes", "no"]}}}
    status, answered = client.post("/v1/chat/completions", {"messages": chat["messages"], "max_tokens": 20,
                                                            "temperature": 0, "response_format": schema})  # fmt: skip
    assert status == 200 and json.loads(answered["choices"][0]["message"]["content"]) in ("yes", "no")
    status, tokenized = client.post("/tokenize", {"prompt": "naïve café"})
    assert client.post("/detokenize", {"tokens": tokenized["tokens"]})[1]["prompt"] == "naïve café"
