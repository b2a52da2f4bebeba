"""The worker pools scaled as one application: Serve's application-level policy, deployed from a Serve
config as ``serve run`` does, on the simulated engine, whose hardware profile fixes how fast each pool works.

The prefill pool's own target is out of reach here (``target_queued_prefill_tokens``), so only the policy's
ratio logic can grow it: long generations grow the decode pool on its own load, and the rates the replicas
measure (a prompt computed at ~3 ms a token; a sequence decoding a token per 20 ms step, two at a time on a
decode replica at its target) ask for about one prefill replica per decode replica (300 / 326 s against
100 / 100 s), more than ``ratio_slack`` lets one serve two."""

from __future__ import annotations

import json

import pytest
from faults import Load, pools, wait_pools
from service_client import ServiceClient, prompt, service_config
from test_service_autoscaling import SCALING

from pdserve.up import start

pytestmark = pytest.mark.service

API_KEY = "coordinated-key-81d2"
# A 300-token prompt takes 920 ms to compute; a decode step 20 ms, whatever the batch.
PROFILE = {"name": "coordinated-test", "source": "tests: slow prompts, batched decodes", "base_ms": 20.0,
           "prefill_ms_per_token": 3.0, "prefill_ms_per_token2": 0.0, "decode_ms_per_seq": 0.0,
           "decode_ms_per_context_token": 0.0, "kv_bytes_per_token": 1, "link_bytes_per_s": 1e9}  # fmt: skip


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    profile = tmp_path_factory.mktemp("profile") / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    overrides = {
        "engine.kind": "simulated", "engine.simulated_profile": str(profile), "engine.num_kv_blocks": 1024,
        "service.prefill.autoscaling": {**SCALING, "target_queued_prefill_tokens": 1e9},  # never grows on its own
        "service.decode.autoscaling": {**SCALING, "target_running_seqs": 2},
        "service.coordination": {"ratio_slack": 1.2},
        "router.api_keys": [API_KEY],  # reaches the router as env, not through the Serve config
    }  # fmt: skip
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(service):
    c = ServiceClient(service, api_key=API_KEY)
    yield c
    c.close()


def test_the_app_runs_pdserves_application_level_policy(service):
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployed = details["applications"][service.config.service.app_name]["deployed_app_config"]
    assert deployed["autoscaling_policy"]["policy_function"] == "pdserve.autoscaling:CoordinatedPolicy"
    assert "cluster_token" not in deployed["args"] and "api_keys" not in deployed["args"]["router"]
    assert API_KEY not in str(details)


def test_the_api_keys_left_out_of_the_serve_config_still_guard_the_router(client):
    body = b'{"prompt": "hi", "max_tokens": 1}'
    status, reply = client.post_raw("/v1/completions", body, headers={"Authorization": ""})  # no key
    assert status == 401, reply
    assert client.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200


def test_the_ratio_grows_the_prefill_pool_beside_the_decode_pool_and_both_come_back(client):
    assert pools(client) == {"prefill": 1, "decode": 1}
    # 300 uncached tokens: more than the decode worker computes itself (local_prefill_max_uncached_tokens).
    load = Load(lambda n: client.greedy(prompt(300, 1000 + n), 100)[2], clients=8).start()
    try:
        grew = wait_pools(client, {"prefill": 2, "decode": 2}, 180)
    finally:
        load.stop()
    shrank = wait_pools(client, {"prefill": 1, "decode": 1}, 120)
    assert load.errors == [] and all(last.finish_reason == "length" for last in load.results)
    print(f"\ncoordinated: both pools at 2 in {grew:.1f} s, back to one replica {shrank:.1f} s after the load")
