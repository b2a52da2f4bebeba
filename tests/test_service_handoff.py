"""When a prefill worker gives the decode worker a prompt's transfer handle: up front when the prompt starts in
the next step, when its prefill ends when it queues behind a step's worth of other prompts.

On the simulated engine, slowed so that a prefill backlog lasts seconds: one prefill and one decode replica, so
every prompt queues on the same prefill worker and waits for its KV on the same decode worker.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from service_client import prompt, service_config, simulated_greedy

from pdserve.up import start

pytestmark = pytest.mark.service

# 1 ms a prompt token, chunked 2,048 tokens a step (the simulated engine's default budget, vLLM's): two prompts of
# 1,100 tokens start in the first step, the third and later queue behind a step's worth.
PROFILE = {"name": "handoff-test", "source": "tests: slow prompts", "base_ms": 5.0, "prefill_ms_per_token": 1.0,
           "prefill_ms_per_token2": 0.0, "decode_ms_per_seq": 0.0, "decode_ms_per_context_token": 0.0,
           "kv_bytes_per_token": 1, "link_bytes_per_s": 1e9}  # fmt: skip
PROMPT_TOKENS, PROMPTS, STARTING_AT_ONCE = 1100, 6, 2


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    profile = tmp_path_factory.mktemp("profile") / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    overrides = {"engine.kind": "simulated", "engine.simulated_profile": str(profile), "engine.max_model_len": 2048,
                 "engine.num_kv_blocks": 256}  # fmt: skip
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    yield running
    running.stop()


def test_prompts_queued_on_the_prefill_worker_hold_no_decode_kv_until_their_prefill_ends(client, model_dir):
    """Only the prompts that start at once wait for their KV on the decode side (holding its blocks): the rest
    reach it when their prefill has ended, so a prefill backlog holds none of the decode pool."""
    prompts = [prompt(PROMPT_TOKENS, 100 + n) for n in range(PROMPTS)]
    replies: list[list] = [[] for _ in prompts]
    senders = [threading.Thread(target=client.greedy_into, args=(ids, 4, into), daemon=True)
               for ids, into in zip(prompts, replies, strict=True)]  # fmt: skip
    for sender in senders:
        sender.start()
    most_queued = most_waiting_for_kv = 0
    deadline = time.monotonic() + 60
    while any(sender.is_alive() for sender in senders):
        assert time.monotonic() < deadline, "the prompts did not complete in 60 s"
        workers = client.status().workers
        most_queued = max([most_queued, *(w.queued_prefill_tokens for w in workers if w.role == "prefill")])
        most_waiting_for_kv = max([most_waiting_for_kv, *(w.waiting_seqs for w in workers if w.role == "decode")])
        time.sleep(0.1)
    assert most_queued >= 3 * PROMPT_TOKENS  # a backlog formed on the prefill worker
    assert most_waiting_for_kv <= STARTING_AT_ONCE
    for ids, into in zip(prompts, replies, strict=True):
        assert [t for r in into for t in r.token_ids] == simulated_greedy(model_dir, ids, 4)
        assert into[-1].timing.placement == "disaggregated" and into[-1].usage.kv_transferred_tokens > 0
