"""The benchmarks' footprint sampler: memory and CPU of every process under the benchmark, grouped by role."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

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


BURN_THEN_SLEEP = """
import time
began = time.process_time()
while time.process_time() - began < 1.0:
    pass
time.sleep(60)
"""


def test_with_a_sample_at_each_end_only_the_cpu_between_them_is_counted():
    child = subprocess.Popen([sys.executable, "-c", BURN_THEN_SLEEP])
    try:
        with Footprint(interval_s=3600, memory=False) as footprint:
            deadline = time.monotonic() + 30
            while sum(psutil.Process(child.pid).cpu_times()[:2]) < 1.0:  # the burn, from the first sample on
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert 0.7 <= footprint.summary()["cores_busy"] * footprint.summary()["sampled_s"] <= 1.3
    finally:
        child.kill()
        child.wait(10)


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
