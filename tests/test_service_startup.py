"""Starting the service: enough Ray CPUs for every pool, a deadline on a deployment that cannot start, and
no open router when API keys were asked for."""

from __future__ import annotations

import time

import pytest
from service_client import service_config

from pdserve.config import load_config
from pdserve.up import _check_keys_enforced, cpus_needed, start


def test_the_local_cluster_gets_a_cpu_for_every_replica_the_pools_may_have():
    service = load_config(
        overrides={"service.decode.autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
                   "service.prefill.num_replicas": 2}
    ).service  # fmt: skip
    assert cpus_needed(service) == 6  # router 0.5 + 3 decode + 2 prefill, rounded up
    assert cpus_needed(service.model_copy(update={"mode": "colocated"})) == 4  # no prefill pool


@pytest.mark.service
def test_a_replica_that_cannot_be_placed_fails_the_start_within_its_deadline(model_dir, tmp_path):
    # The simulated engine: the decode replica that does start needs no vLLM start on the way to the deadline.
    config = service_config(model_dir, tmp_path, **{"engine.kind": "simulated", "service.prefill.num_gpus": 1})
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="PrefillWorker"):
        start(config, num_cpus=8, ready_timeout_s=10)
    # Ray's start, the 10 s deadline and Ray's shutdown; not Serve's drain, which would wait out the pool's
    # grace period (30 s) for the replica that was never placed
    assert time.monotonic() - began < 40


def test_a_router_that_answers_without_an_api_key_fails_the_coordinated_start():
    """The keys travel as env, not in the Serve config: an open router means they did not arrive."""
    import http.server
    import threading

    class Open(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.headers.get("Authorization") is None and self.server.open else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Open)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        server.open = False
        _check_keys_enforced(url)  # 401 without a key: guarded
        server.open = True
        with pytest.raises(RuntimeError, match="PDSERVE_ROUTER__API_KEYS"):
            _check_keys_enforced(url)
    finally:
        server.shutdown()
