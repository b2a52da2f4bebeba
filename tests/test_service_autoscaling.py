"""The pools scale on their own load, in a real Serve app: long prompts grow the prefill pool, long
generations the decode pool, and both come back down with no request lost."""

from __future__ import annotations

import time

import pytest
from faults import Load, live_workers
from service_client import prompt, service_config

from pdserve.up import start

pytestmark = pytest.mark.service

SCALING = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 4,
           "look_back_period_s": 2, "metrics_interval_s": 0.5}  # fmt: skip


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    overrides = {
        "service.prefill.autoscaling": {**SCALING, "target_queued_prefill_tokens": 800},
        "service.decode.autoscaling": {**SCALING, "target_running_seqs": 6},
    }
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    yield running
    running.stop()


def pools(client) -> dict[str, int]:
    return {role: len(live_workers(client, role)) for role in ("prefill", "decode")}


def wait_pools(client, want: dict[str, int], timeout_s: float) -> float:
    start = time.monotonic()
    while pools(client) != want:
        assert time.monotonic() - start < timeout_s, f"pools {pools(client)}, not {want}, after {timeout_s} s"
        time.sleep(0.5)
    return time.monotonic() - start


def test_long_prompts_grow_the_prefill_pool_and_long_generations_the_decode_pool_and_both_come_back(client):
    assert pools(client) == {"prefill": 1, "decode": 1}
    long_prompts = Load(lambda n: client.greedy(prompt(800, 1000 + n), 1)[2], clients=6).start()
    try:
        grew = wait_pools(client, {"prefill": 2, "decode": 1}, 90)
    finally:
        long_prompts.stop()
    long_outputs = Load(lambda n: client.greedy(prompt(30, 5000 + n), 300)[2], clients=16).start()
    try:
        wait_for_decode = time.monotonic()
        while pools(client)["decode"] < 2:
            assert time.monotonic() - wait_for_decode < 90, f"the decode pool did not grow: {pools(client)}"
            time.sleep(0.5)
    finally:
        long_outputs.stop()
    shrank = wait_pools(client, {"prefill": 1, "decode": 1}, 120)
    print(f"\nautoscaling: prefill grew in {grew:.1f} s, both back to one replica {shrank:.1f} s after the load")
    assert long_prompts.errors == [] and long_outputs.errors == []
    assert all(last.finish_reason == "length" for last in long_prompts.results + long_outputs.results)
    client.wait_idle(10)
