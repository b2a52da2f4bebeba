"""The benchmarks' footprint sampler: memory and CPU of every process under the benchmark, grouped by role."""

from __future__ import annotations

import subprocess
import sys

from bench.footprint import Footprint, group_of

BURN_AND_HOLD = """
import time
held = bytearray(256 << 20)  # touched: resident
for i in range(0, len(held), 4096):
    held[i] = 1
began = time.process_time()
while time.process_time() - began < 1.0:
    pass
"""


def test_a_child_process_memory_and_cpu_are_counted():
    with Footprint(interval_s=0.1) as footprint:
        subprocess.run([sys.executable, "-c", BURN_AND_HOLD], check=True, timeout=60)
    summary = footprint.summary()
    assert summary["peak_pss_gib"] >= 0.25
    cpu_s = summary["cores_busy"] * summary["sampled_s"]
    assert 0.8 <= cpu_s  # the child's second of CPU, all but its last tenth of a second at most
    assert set(summary["cores_busy_by_group"]) == {"other"}


def test_replicas_are_grouped_by_deployment_and_rays_processes_together():
    assert group_of("ray::ServeReplica:pdserve:DecodeWorker") == "DecodeWorker"
    assert group_of("ray::ServeReplica:pdserve:PrefillWorker") == "PrefillWorker"
    assert group_of("ray::ServeReplica:pdserve:DecodeWorker.handle_request_with_rejection") == "DecodeWorker"
    assert group_of("ray::ProxyActor") == "ray"
    assert group_of("/x/.venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --port=1") == "ray"
    assert group_of("/usr/bin/redis-server 127.0.0.1:6379") == "other"
