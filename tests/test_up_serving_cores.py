"""A local cluster's serving processes keep to the node's reserved core (pdserve/up.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from pdserve import app
from pdserve.app import serve_application
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
    assert confined_to(local, app.layout(local)) == [0]
    joined = local.model_copy(update={"ray_address": "10.0.0.1:6379"})
    assert confined_to(joined, app.layout(joined)) == []


def test_serves_controller_lays_a_confined_cluster_out_over_the_nodes_cores_not_its_own(model_dir, monkeypatch):
    config = load_config(overrides={"engine.model": str(model_dir), "service.mode": "colocated"})
    args = serve_application(config, node_cores=[0, 1, 2, 3])["args"]
    laid_out = []  # what the app's builder planned (the real plan, recorded)
    plan = app.layout
    monkeypatch.setattr(app, "layout", lambda *given: laid_out.append(plan(*given)) or laid_out[-1])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # Serve's controller, on the reserved core
    app.app_builder(args)
    (decode,) = [pools["decode"].cores for pools in laid_out]
    assert decode.node_cores == (0, 1, 2, 3) and decode.per_rank == 3 and decode.reserved == 1
