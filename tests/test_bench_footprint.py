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


TWO_ON_ONE_CORE = """
import os, subprocess, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
burn = "import time\\nbegan = time.process_time()\\nwhile time.process_time() - began < 0.5: pass"
for child in [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]:
    child.wait(60)
"""


def test_the_time_two_processes_on_one_core_wait_for_it_is_counted():
    with Footprint(interval_s=0.1) as footprint:
        subprocess.run([sys.executable, "-c", TWO_ON_ONE_CORE], check=True, timeout=60)
    summary = footprint.summary()
    waited_s = summary["cores_waited_for_by_group"]["other"] * summary["sampled_s"]
    assert 0.3 <= waited_s  # each waits while the other runs: ~0.5 s between them, less its last tenth


def test_processes_are_grouped_as_the_caller_says():
    with Footprint(interval_s=0.1, grouping=lambda process: f"pid {process.pid}") as footprint:
        child = subprocess.Popen([sys.executable, "-c", BURN_AND_HOLD])
        child.wait(60)
    assert f"pid {child.pid}" in footprint.summary()["cores_busy_by_group"]


def test_replicas_are_grouped_by_deployment_and_rays_processes_together():
    assert group_of("ray::ServeReplica:pdserve:DecodeWorker") == "DecodeWorker"
    assert group_of("ray::ServeReplica:pdserve:PrefillWorker") == "PrefillWorker"
    assert group_of("ray::ServeReplica:pdserve:DecodeWorker.handle_request_with_rejection") == "DecodeWorker"
    assert group_of("ray::ProxyActor") == "ray"
    assert group_of("/x/.venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --port=1") == "ray"
    assert group_of("/usr/bin/redis-server 127.0.0.1:6379") == "other"
