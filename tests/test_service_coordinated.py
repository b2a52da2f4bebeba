"""The worker pools scaled as one application: Serve's application-level policy, deployed from a
Serve config as ``serve run`` does. Each pool still grows on its own load first, and comes back."""

from __future__ import annotations

import pytest
from faults import ramp_each_pool_and_back
from service_client import ServiceClient, service_config
from test_service_autoscaling import SCALING

from pdserve.up import start

pytestmark = pytest.mark.service

API_KEY = "coordinated-key-81d2"


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    overrides = {
        "service.prefill.autoscaling": {**SCALING, "target_queued_prefill_tokens": 800},
        "service.decode.autoscaling": {**SCALING, "target_running_seqs": 6},
        "service.coordination": {"ratio_slack": 4.0},
        "router.api_keys": [API_KEY],  # reaches the router as env, not through the Serve config
    }
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


def test_under_the_coordinated_policy_each_pool_grows_on_its_own_load_and_both_come_back(client):
    grew, shrank = ramp_each_pool_and_back(client)
    print(f"\ncoordinated: prefill grew in {grew:.1f} s, both back to one replica {shrank:.1f} s after the load")
