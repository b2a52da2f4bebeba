"""Each pool's engine checked, and its cores planned, before any replica starts (pdserve/engine_layout.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core_ledger import CoreLedger, CoreRequest, bound_cores
from pdserve.config import ConfigError, load_config
from pdserve.engine_layout import plan, serving_cores


@pytest.fixture
def cores(monkeypatch):
    """Pretend this node has ``n`` cores."""

    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))

    return set_cores


def node(n: int) -> tuple[int, ...]:
    """A node's cores, as the plan reads them: 0 … n-1."""
    return tuple(range(n))


def config(model_dir, **overrides):
    return load_config(overrides={"engine.model": str(model_dir), **overrides})


def test_on_a_big_node_every_rank_gets_cores_of_its_own_above_the_reserved_one(model_dir, cores):
    cores(16)
    pools = plan(config(model_dir, **{"service.decode.num_replicas": 2, "service.prefill.num_replicas": 2}),
                 ["decode", "prefill"])  # fmt: skip
    # 2 decode + 2 prefill replicas, one rank each: 4 ranks over 15 unreserved cores
    assert (
        pools["decode"].cores
        == pools["prefill"].cores
        == CoreRequest(per_rank=3, node_cores=node(16), ranks=1, reserved=1)
    )


def test_a_pool_runs_its_own_tensor_parallel_size_and_gets_cores_for_each_rank(model_dir, cores):
    cores(16)
    pools = plan(config(model_dir, **{"service.mode": "colocated", "service.decode.engine":
                                      {"tensor_parallel_size": 2}}), ["decode"])  # fmt: skip
    assert pools["decode"].engine.tensor_parallel_size == 2
    assert pools["decode"].cores == CoreRequest(per_rank=7, node_cores=node(16), ranks=2, reserved=1)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2), (2, 2)])
def test_disaggregated_pools_may_run_different_tensor_parallel_sizes(model_dir, cores, prefill_tp, decode_tp):
    cores(16)
    pools = plan(config(model_dir, **{"service.prefill.engine": {"tensor_parallel_size": prefill_tp},
                                      "service.decode.engine": {"tensor_parallel_size": decode_tp}}),
                 ["decode", "prefill"])  # fmt: skip
    assert (pools["prefill"].engine.tensor_parallel_size, pools["decode"].engine.tensor_parallel_size) == (
        prefill_tp, decode_tp)  # fmt: skip


def test_pools_whose_kv_element_types_differ_are_refused_naming_both(model_dir, cores):
    cores(16)
    with pytest.raises(ConfigError, match="service.prefill.engine.dtype 'float32' != engine.dtype 'bfloat16'"):
        plan(config(model_dir, **{"engine.dtype": "bfloat16", "service.prefill.engine": {"dtype": "float32"}}),
             ["decode", "prefill"])  # fmt: skip


def test_a_model_whose_kv_is_not_split_by_head_is_refused_different_tensor_parallel_sizes(model_dir, cores, tmp_path):
    cores(16)
    latent = tmp_path / "latent"
    shutil.copytree(model_dir, latent)
    hf = json.loads((latent / "config.json").read_text())
    (latent / "config.json").write_text(json.dumps({**hf, "kv_lora_rank": 64}))
    with pytest.raises(ConfigError, match="not split by head; the pools must run one tensor-parallel size"):
        plan(config(latent, **{"service.prefill.engine": {"tensor_parallel_size": 2}}), ["decode", "prefill"])


def test_more_ranks_than_cores_still_bind_a_core_per_rank_sharing_some(model_dir, cores):
    cores(2)
    pools = plan(config(model_dir, **{"service.prefill.engine": {"tensor_parallel_size": 2}}), ["decode", "prefill"])
    assert pools["prefill"].cores == CoreRequest(per_rank=1, node_cores=node(2), ranks=2, reserved=0)
    assert pools["decode"].cores == CoreRequest(per_rank=1, node_cores=node(2), ranks=1, reserved=0)
    assert pools["prefill"].shares_serving_cores and pools["decode"].shares_serving_cores  # none runs ahead


def test_two_cores_disaggregated_split_the_node_and_reserve_none(model_dir, cores):
    cores(2)
    pools = plan(config(model_dir), ["decode", "prefill"])
    assert (
        pools["decode"].cores
        == pools["prefill"].cores
        == CoreRequest(per_rank=1, node_cores=node(2), ranks=1, reserved=0)
    )


def test_with_no_core_reserved_the_serving_processes_share_the_prefill_cores_and_decode_runs_ahead(model_dir, cores):
    cores(2)
    pools = plan(config(model_dir), ["decode", "prefill"])
    assert pools["prefill"].shares_serving_cores and not pools["decode"].shares_serving_cores
    assert "shared with the serving processes" in pools["prefill"].describe()


def test_with_a_core_reserved_every_pool_runs_ahead_of_the_serving_processes(model_dir, cores):
    cores(8)
    assert not any(p.shares_serving_cores for p in plan(config(model_dir), ["decode", "prefill"]).values())


def test_co_located_on_one_core_the_serving_processes_share_the_decode_cores(model_dir, cores):
    cores(1)
    assert plan(config(model_dir), ["decode"])["decode"].shares_serving_cores


def test_where_a_core_is_reserved_the_serving_processes_keep_to_it(model_dir, cores):
    cores(4)
    assert serving_cores(plan(config(model_dir, **{"service.mode": "colocated"}), ["decode"])) == [0]


@pytest.mark.parametrize(
    ("n", "overrides"),
    [(2, {}), (8, {"engine.cpu_cores": "1-7", "service.prefill.cpu_cores": "1-3"})],
    ids=["engines-bind-every-core", "cores-given"],
)
def test_the_serving_processes_are_not_confined_where_no_core_is_reserved_for_them(model_dir, cores, n, overrides):
    cores(n)
    assert serving_cores(plan(config(model_dir, **overrides), ["decode", "prefill"])) == []


def test_a_replica_confined_to_the_reserved_core_claims_the_cores_above_it_from_the_plan(model_dir, cores, tmp_path):
    cores(2)
    request = plan(config(model_dir, **{"service.mode": "colocated"}), ["decode"])["decode"].cores
    cores(1)  # the replica's own process: confined to the reserved core
    assert CoreLedger(tmp_path / "cores.json").claim(os.getpid(), request) == "1"


def test_simulated_engines_whose_steps_sleep_bind_no_core_and_leave_the_serving_processes_free(model_dir, cores):
    cores(32)
    sims = {"engine.kind": "simulated", "engine.num_kv_blocks": 64, "service.decode.num_replicas": 16}
    pools = plan(config(model_dir, **sims), ["decode", "prefill"])
    assert pools["decode"].cores is None and pools["prefill"].cores is None and serving_cores(pools) == []
    assert "asleep on no core" in pools["decode"].describe()


def test_cores_given_are_never_replaced(model_dir, cores):
    cores(8)
    pools = plan(config(model_dir, **{"engine.cpu_cores": "5", "service.prefill.cpu_cores": "6-7"}),
                 ["decode", "prefill"])  # fmt: skip
    assert pools["decode"].cores is None and pools["decode"].engine.cpu_cores == "5"
    assert pools["prefill"].cores is None and pools["prefill"].engine.cpu_cores == "6-7"
    assert "cores 6-7 (as configured)" in pools["prefill"].describe()


def test_replicas_claim_disjoint_cores_and_a_dead_ones_come_back(tmp_path):
    ledger = CoreLedger(tmp_path / "cores.json")
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert ledger.claim(first.pid, CoreRequest(per_rank=2, node_cores=node(4), reserved=1)) == "1-2"
        assert ledger.claim(os.getpid(), CoreRequest(per_rank=1, node_cores=node(4), reserved=1)) == "3"
        assert ledger.claim(12345678, CoreRequest(per_rank=1, node_cores=node(4), reserved=1)) is None  # none left
    finally:
        first.kill()
        first.wait()
    # the killed one's, free again
    assert ledger.claim(os.getppid(), CoreRequest(per_rank=2, node_cores=node(4), reserved=1)) == "1-2"
    ledger.release(os.getpid())
    assert ledger.claims() == {os.getppid(): [1, 2]}


def test_a_claim_whose_pid_another_process_has_since_taken_is_free_again(tmp_path):
    path = tmp_path / "cores.json"
    path.write_text(json.dumps({str(os.getpid()): {"started": 1, "cores": [1, 2]}}))  # this pid, an earlier process
    ledger = CoreLedger(path)
    assert ledger.claim(os.getppid(), CoreRequest(per_rank=3, node_cores=node(4), reserved=1)) == "1-3"


def _claim_and_release(path: str, rounds: int) -> None:
    ledger = CoreLedger(Path(path))
    for _ in range(rounds):
        ledger.claim(os.getpid(), CoreRequest(per_rank=1, node_cores=node(64), reserved=1))
        ledger.release(os.getpid())


def test_replicas_claiming_at_once_leave_a_ledger_every_one_can_read(tmp_path):
    path = tmp_path / "cores.json"
    context = multiprocessing.get_context("spawn")
    claimants = [context.Process(target=_claim_and_release, args=(str(path), 300)) for _ in range(6)]
    for claimant in claimants:
        claimant.start()
    for claimant in claimants:
        claimant.join(120)
    assert [c.exitcode for c in claimants] == [0] * 6  # none failed to read what another wrote
    assert json.loads(path.read_text()) == {}


def test_an_unreadable_ledger_is_started_afresh_with_a_warning_not_left_to_fail_every_replica(tmp_path, caplog):
    path = tmp_path / "cores.json"
    path.write_text('{"1": {"started": 1, "cores": [1]}}{"2"')
    ledger = CoreLedger(path)
    assert ledger.claim(os.getpid(), CoreRequest(per_rank=1, node_cores=node(4), reserved=1)) == "1"
    assert "unreadable" in caplog.text and ledger.claims() == {os.getpid(): [1]}


@pytest.mark.parametrize(
    ("setting", "field", "message"),
    [
        ("engine.tensor_parallel_size=3", "engine.tensor_parallel_size", "does not divide the model's 4 attention"),
        ("service.prefill.engine={tensor_parallel_size: 64}", "service.prefill.engine.tensor_parallel_size",
         "does not divide"),
        ("engine.gpu_memory_utilization=1.5", "engine.gpu_memory_utilization", "less than or equal to 1"),
        ("engine.gpu_memory_utilization=0", "engine.gpu_memory_utilization", "greater than 0"),
    ],
)  # fmt: skip
def test_bad_engine_settings_stop_pdserve_up_before_anything_starts(tmp_path, setting, field, message):
    result = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "up", "--set", setting, "--set", f"model_cache_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert field in result.stderr and message in result.stderr, result.stderr[-2000:]
    assert "starting Ray" not in result.stdout


def test_more_ranks_than_a_node_has_cores_is_refused(model_dir, cores):
    cores(2)
    with pytest.raises(ConfigError, match="engine.tensor_parallel_size: 4 ranks need a core each; this node has 2"):
        plan(config(model_dir, **{"engine.tensor_parallel_size": 4}), ["decode"])


def test_a_pools_own_context_length_is_refused_the_router_checks_one_for_the_service(model_dir):
    with pytest.raises(ValueError, match=r"service.decode.engine.max_model_len: the same for every pool"):
        config(model_dir, **{"service.decode.engine": {"max_model_len": 256}}).pool_engine("decode")


def test_the_bind_string_names_each_ranks_cores():
    assert bound_cores("0|1") == [0, 1] and bound_cores("0-1|2-3") == [0, 1, 2, 3]
