"""The processes that step the model are set ahead of the serving processes for the CPU, thread by thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.process_priority import can_lower_niceness, descendants, model_processes, prioritize

REPO = Path(__file__).resolve().parent.parent
_TWO_THREADS = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"
_AT_15 = "os.setpriority(os.PRIO_PROCESS, 0, 15)"
_UNPRIVILEGED = f"""
import os, subprocess, sys
from engine.errors import EngineConfigError
from engine.process_priority import prioritize
child = subprocess.Popen([sys.executable, "-c", {_TWO_THREADS!r}], preexec_fn=lambda: {_AT_15})
try:
    prioritize({{child.pid}}, None if sys.argv[1] == "unset" else int(sys.argv[1]))
    print(os.getpriority(os.PRIO_PROCESS, child.pid))
except EngineConfigError as exc:
    print("refused", exc.field, exc)
finally:
    child.kill()
"""
# As vLLM starts its engine core and the core its rank worker: multiprocessing's spawn, which also
# starts a resource tracker beside the parent.
_ENGINE_CORE = """
import multiprocessing, time
if __name__ == "__main__":
    multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,), daemon=True).start()
    time.sleep(60)
"""

# A replica's engine thread (at its process's niceness, 15) starting an engine core, then settling it.
_REPLICA = """
import json, os, subprocess, sys, threading, time
import psutil
from engine.process_priority import descendants, model_processes, settle, spawning_at

ENGINE_CORE = sys.argv[1]
def nicenesses(pid):
    return sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")})
found = {}
def start_engine():  # the replica's engine thread
    before = descendants()
    with spawning_at(None):
        found["core"] = subprocess.Popen([sys.executable, "-c", ENGINE_CORE])
        deadline = time.monotonic() + 30
        while len(descendants() - before) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    found["pids"] = descendants() - before
    found["loading"] = sorted({n for pid in found["pids"] for n in nicenesses(pid)})
    found["thread_after"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
thread = threading.Thread(target=start_engine)
thread.start()
thread.join(60)
pids = found["pids"]
settle(pids, None)
(worker,) = model_processes(pids)
print(json.dumps([found["loading"], found["thread_after"], {pid: nicenesses(pid) for pid in pids}, worker]))
for process in psutil.Process(found["core"].pid).children() + [psutil.Process(found["core"].pid)]:
    process.kill()
"""


def nicenesses(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def engine_like():
    """A two-thread process started at nice 15, as Ray starts its workers (and so vLLM's processes)."""
    at_15 = lambda: os.setpriority(os.PRIO_PROCESS, 0, 15)  # noqa: E731
    child = subprocess.Popen([sys.executable, "-c", _TWO_THREADS], preexec_fn=at_15)
    wait_for(lambda: len(os.listdir(f"/proc/{child.pid}/task")) >= 2)
    yield child.pid
    child.kill()
    child.wait(10)


def unprivileged(nice: str) -> str:
    """``prioritize`` run by a process that may not lower a niceness (CAP_SYS_NICE dropped, util-linux's
    ``setpriv``), on a nice-15 child of its own."""
    command = [sys.executable, "-c", _UNPRIVILEGED, nice]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() + "\n" + done.stderr


def test_a_niceness_given_reaches_every_thread(engine_like):
    prioritize({engine_like}, 17)
    assert nicenesses(engine_like) == {17}


@pytest.mark.skipif(not can_lower_niceness(), reason="lowering a niceness needs CAP_SYS_NICE")
def test_unset_lowers_the_engine_to_nice_0_where_the_os_allows(engine_like):
    prioritize({engine_like}, None)
    assert nicenesses(engine_like) == {0}


def test_unset_leaves_the_engine_as_started_where_lowering_is_refused():
    out = unprivileged("unset")
    assert out.startswith("15\n") and "stay at nice 15" in out


def test_a_niceness_given_that_the_os_refuses_fails_naming_the_field():
    out = unprivileged("0")
    assert out.startswith("refused nice ") and "CAP_SYS_NICE" in out


def test_the_model_process_is_the_rank_worker_not_the_engine_core_nor_a_resource_tracker():
    before = descendants()
    engine_core = subprocess.Popen([sys.executable, "-c", _ENGINE_CORE])
    try:
        wait_for(lambda: len(descendants() - before) >= 3)  # the core, its worker, the core's resource tracker
        (worker,) = [p.pid for p in psutil.Process(engine_core.pid).children()
                     if "resource_tracker" not in " ".join(p.cmdline())]  # fmt: skip
        assert model_processes(descendants() - before) == {worker}
        assert model_processes({engine_core.pid}) == {engine_core.pid}  # alone, it steps the model itself
    finally:
        for process in psutil.Process(engine_core.pid).children() + [psutil.Process(engine_core.pid)]:
            process.kill()
        engine_core.wait(10)


@pytest.mark.skipif(not can_lower_niceness(), reason="lowering a niceness needs CAP_SYS_NICE")
def test_an_engine_starts_at_the_models_niceness_and_settles_its_core_back_with_the_serving_processes():
    """In a replica-like process at nice 15: what its engine thread spawns starts at 0 (not starved while it
    loads beside a running engine on a shared core); after ``settle`` only the rank worker stays at 0."""
    done = subprocess.run([sys.executable, "-c", _REPLICA, _ENGINE_CORE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=lambda: os.setpriority(
                              os.PRIO_PROCESS, 0, 15))  # fmt: skip
    assert done.returncode == 0, done.stderr
    loading, thread_after, settled, worker = json.loads(done.stdout)
    assert set(loading) == {0} and thread_after == 15
    assert settled.pop(str(worker)) == [0] and all(n == [15] for n in settled.values())


# A replica (nice 15) settling an engine core whose rank worker binds itself to one core, as vLLM's CPU worker
# binds its OpenMP threads; argv: the rank's core, the niceness ``settle`` is given ("unset": None).
_REPLICA_WITH_BOUND_RANK = """
import json, os, subprocess, sys, time
from engine.process_priority import descendants, model_processes, settle
rank_core, nice = int(sys.argv[1]), None if sys.argv[2] == "unset" else int(sys.argv[2])
rank = "import os, time; os.sched_setaffinity(0, {%d}); time.sleep(60)" % rank_core
core = "import subprocess, sys, threading, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]]); " \\
       "threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"
before = descendants()
engine_core = subprocess.Popen([sys.executable, "-c", core, rank])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    pids = descendants() - before
    models = model_processes(pids)
    if len(pids) == 2 and all(os.sched_getaffinity(p) == {rank_core} for p in models) \\
            and len(os.listdir(f"/proc/{engine_core.pid}/task")) >= 2:
        break
    time.sleep(0.05)
else:
    sys.exit("the engine core's rank worker did not start and bind itself within 30 s")
settle(pids, nice)
(rank_pid,) = model_processes(pids)
threads = os.listdir(f"/proc/{engine_core.pid}/task")
print(json.dumps({"core": sorted({c for t in threads for c in os.sched_getaffinity(int(t))}),
                  "rank": sorted(os.sched_getaffinity(rank_pid))}))
for pid in pids:
    os.kill(pid, 9)
"""


def settled_cores(nice: str) -> dict:
    rank_core = max(os.sched_getaffinity(0))
    done = subprocess.run([sys.executable, "-c", _REPLICA_WITH_BOUND_RANK, str(rank_core), nice], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
                          preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 15))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding one core apart needs two")
@pytest.mark.skipif(not can_lower_niceness(), reason="a rank ahead of its engine core needs CAP_SYS_NICE")
def test_the_engine_core_settles_on_the_cores_of_rank_workers_that_run_ahead_of_it():
    rank_core = max(os.sched_getaffinity(0))
    assert settled_cores("unset") == {"core": [rank_core], "rank": [rank_core]}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding one core apart needs two")
def test_the_engine_core_stays_free_beside_rank_workers_at_its_own_niceness():
    cores = settled_cores("15")
    assert cores["core"] == sorted(os.sched_getaffinity(0)) and cores["rank"] == [max(os.sched_getaffinity(0))]
