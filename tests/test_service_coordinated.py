"""The worker pools scaled as one application: Serve's application-level policy, deployed from a
Serve config as ``serve run`` does. Each pool still grows on its own load first, and comes back."""

from __future__ import annotations

import pytest
from faults import ramp_each_pool_and_back
from service_client import service_config
from test_service_autoscaling import SCALING

from pdserve.up import start

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    overrides = {
        "service.prefill.autoscaling": {**SCALING, "target_queued_prefill_tokens": 800},
        "service.decode.autoscaling": {**SCALING, "target_running_seqs": 6},
        "service.coordination": {"ratio_slack": 4.0},
    }
    running = start(service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides), num_cpus=8)
    yield running
    running.stop()


def test_the_app_runs_pdserves_application_level_policy(service):
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployed = details["applications"][service.config.service.app_name]["deployed_app_config"]
    assert deployed["autoscaling_policy"]["policy_function"] == "pdserve.autoscaling:CoordinatedPolicy"
    assert "cluster_token" not in deployed["args"] and "api_keys" not in deployed["args"]["router"]


def test_under_the_coordinated_policy_each_pool_grows_on_its_own_load_and_both_come_back(client):
    grew, shrank = ramp_each_pool_and_back(client)
    print(f"\ncoordinated: prefill grew in {grew:.1f} s, both back to one replica {shrank:.1f} s after the load")
