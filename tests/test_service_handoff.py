"""A prefill backlog: where its prompts wait and what they hold.

When a prefill worker gives the decode worker a prompt's transfer handle: up front when the prompt starts in
the next step, when its prefill ends when it queues behind a step's worth of other prompts. And past the
router's dispatch limit, prompts wait in the router, not on the prefill worker (``router/prefill_queue.py``).

On the simulated engine, slowed so that a prefill backlog lasts seconds: one prefill and one decode replica, so
every prompt queues on the same prefill worker and waits for its KV on the same decode worker.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import pytest
from service_client import prompt, service_config, simulated_greedy

from pdserve.up import start
from pdserve_pb.v1 import generate_pb2 as pb

pytestmark = pytest.mark.service

# 1 ms a prompt token, chunked 2,048 tokens a step (the simulated engine's default budget, vLLM's): two prompts of
# 1,100 tokens start in the first step, the third and later queue behind a step's worth.
PROFILE = {"name": "handoff-test", "source": "tests: slow prompts", "base_ms": 5.0, "prefill_ms_per_token": 1.0,
           "prefill_ms_per_token2": 0.0, "decode_ms_per_seq": 0.0, "decode_ms_per_context_token": 0.0,
           "kv_bytes_per_token": 1, "link_bytes_per_s": 1e9}  # fmt: skip
PROMPT_TOKENS, PROMPTS, STARTING_AT_ONCE = 1100, 6, 2
DISPATCH_LIMIT = 4 * PROMPT_TOKENS  # the router holds prompts while the prefill worker queues four


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    profile = tmp_path_factory.mktemp("profile") / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    overrides = {"engine.kind": "simulated", "engine.simulated_profile": str(profile), "engine.max_model_len": 2048,
                 "engine.num_kv_blocks": 256,
                 "router.placement.prefill_dispatch_limit_tokens": DISPATCH_LIMIT}  # fmt: skip
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    yield running
    running.stop()


def test_prompts_queued_on_the_prefill_worker_hold_no_decode_kv_until_their_prefill_ends(client, model_dir):
    """Only the prompts that start at once wait for their KV on the decode side (holding its blocks): the rest
    reach it when their prefill has ended, so a prefill backlog holds none of the decode pool."""
    seen = burst(client, model_dir, [prompt(PROMPT_TOKENS, 100 + n) for n in range(PROMPTS)])
    assert seen.most_queued >= 3 * PROMPT_TOKENS  # a backlog formed on the prefill worker
    assert seen.most_waiting_for_kv <= STARTING_AT_ONCE


def test_prompts_past_the_dispatch_limit_wait_in_the_router_not_on_the_prefill_worker(client, model_dir):
    """Ten prompts at once: a prompt is placed on the prefill worker only while less than the limit is placed
    there, so it queues about the limit (as its heartbeat reports it: a prompt more where a beat came between
    a placement and its prompt reaching the worker), not all ten; the router holds the rest (its status and its
    gauge say so), and every one completes, disaggregated, in the greedy tokens."""
    seen = burst(client, model_dir, [prompt(PROMPT_TOKENS, 200 + n) for n in range(10)])
    assert seen.most_placed < DISPATCH_LIMIT + PROMPT_TOKENS
    assert seen.most_queued <= DISPATCH_LIMIT + 2 * PROMPT_TOKENS
    assert seen.most_held >= 3 and seen.most_held_gauge >= 3
    assert client.metric("pdserve:router_prefill_queue_requests") == 0
    assert client.metric("pdserve:prefill_hold_timeouts_total") == 0


def test_a_prompt_held_in_the_router_ends_at_once_when_aborted_by_id(client, model_dir):
    """Four prompts fill the prefill worker to the limit (~4 s of prefill); a fifth, held, is aborted by id: it
    ends with finish reason "abort" at once, no token computed, and leaves the router's queue."""
    fillers = [prompt(PROMPT_TOKENS, 300 + n) for n in range(4)]
    replies: list[list] = [[] for _ in fillers]
    senders = [threading.Thread(target=client.greedy_into, args=(ids, 4, into), daemon=True)
               for ids, into in zip(fillers, replies, strict=True)]  # fmt: skip
    for sender in senders:
        sender.start()
    time.sleep(0.3)
    sampling = pb.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    held = client.stub.Generate(pb.GenerateRequest(request_id="held", token_ids=pb.TokenIds(
        ids=prompt(PROMPT_TOKENS, 310)), sampling=sampling), timeout=60)  # fmt: skip
    deadline = time.monotonic() + 2
    while client.metric("pdserve:router_prefill_queue_requests") < 1:
        assert time.monotonic() < deadline, "the fifth prompt was not held"
        time.sleep(0.05)
    aborted_at = time.monotonic()
    assert client.stub.Abort(pb.AbortRequest(request_id="held"), timeout=10).found
    ended = list(held)
    assert time.monotonic() - aborted_at < 1.0
    assert ended[-1].finish_reason == "abort" and not any(r.token_ids for r in ended)
    assert client.metric("pdserve:router_prefill_queue_requests") == 0
    for sender in senders:
        sender.join(60)
    assert all(into and into[-1].finish_reason for into in replies)
    client.wait_idle(5)


@dataclass
class Seen:
    most_queued: int = 0  # prompt tokens queued on the prefill worker
    most_waiting_for_kv: int = 0  # sequences on the decode worker waiting for their KV
    most_placed: int = 0  # prompt tokens placed on the prefill worker and not seen finish, as the router counts
    most_held: int = 0  # prompts the router held for the prefill pool, in its status
    most_held_gauge: int = 0  # the same, in its metrics


def burst(client, model_dir, prompts: list[list[int]]) -> Seen:
    """All of ``prompts`` at once, the service's load sampled until they end; each checked: greedy tokens, its
    prompt computed on the prefill worker and its KV moved."""
    replies: list[list] = [[] for _ in prompts]
    senders = [threading.Thread(target=client.greedy_into, args=(ids, 4, into), daemon=True)
               for ids, into in zip(prompts, replies, strict=True)]  # fmt: skip
    for sender in senders:
        sender.start()
    seen = Seen()
    deadline = time.monotonic() + 60
    while any(sender.is_alive() for sender in senders):
        assert time.monotonic() < deadline, "the prompts did not complete in 60 s"
        status = client.status()
        prefill = [w for w in status.workers if w.role == "prefill"]
        seen.most_queued = max([seen.most_queued, *(w.queued_prefill_tokens for w in prefill)])
        seen.most_placed = max([seen.most_placed, *(w.placed_prefill_tokens for w in prefill)])
        waiting = [w.waiting_seqs for w in status.workers if w.role == "decode"]
        seen.most_waiting_for_kv = max([seen.most_waiting_for_kv, *waiting])
        seen.most_held = max(seen.most_held, status.prefill_held_requests)
        seen.most_held_gauge = max(seen.most_held_gauge, int(client.metric("pdserve:router_prefill_queue_requests")))
        time.sleep(0.1)
    for ids, into in zip(prompts, replies, strict=True):
        assert [t for r in into for t in r.token_ids] == simulated_greedy(model_dir, ids, 4)
        assert into[-1].timing.placement == "disaggregated" and into[-1].usage.kv_transferred_tokens > 0
    return seen
