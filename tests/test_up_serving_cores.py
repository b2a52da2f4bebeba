"""A local cluster's serving processes keep to the node's reserved core (pdserve/up.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from pdserve.config import load_config
from pdserve.up import _serving_processes_on, confined_to


def test_processes_started_while_ray_starts_keep_to_the_given_cores_at_this_processs_niceness():
    before = os.sched_getaffinity(0)
    reserved = [min(before)]
    show = "import os; c = os.sched_getaffinity(0); print(min(c), len(c), os.environ['RAY_worker_niceness'])"
    with _serving_processes_on(reserved):
        shown = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, timeout=60, check=True)
    assert shown.stdout.split() == [str(reserved[0]), "1", str(os.getpriority(os.PRIO_PROCESS, 0))]
    assert os.sched_getaffinity(0) == before and "RAY_worker_niceness" not in os.environ  # as it was


def test_a_cluster_joined_is_not_confined_a_local_one_is_where_a_core_is_reserved(model_dir, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    local = load_config(overrides={"engine.model": str(model_dir), "service.mode": "colocated"})
    assert confined_to(local) == [0]
    joined = local.model_copy(update={"ray_address": "10.0.0.1:6379"})
    assert confined_to(joined) == []
