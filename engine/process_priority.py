"""The processes that step the model ahead of the serving processes for the CPU (Linux niceness).

Ray starts its worker processes at nice 15: Serve's proxy, pdserve's router and
worker replicas, and so the vLLM engine core and workers a replica starts. The
client, Ray's daemons and whatever else runs on the node stay at 0. Measured on
this repository's 2-core machine (README, "Cores on CPU nodes"), one server,
the niceness changed between runs:

- vLLM's rank workers (each bound to cores of its own) at 0 instead of 15
  (``python -m bench.niceness_ab``): ITL p50 19.2 -> 12.4 ms, throughput
  1.23x: at 15 every wake-up of a nice-0 process on their core holds the step up.
- The engine core at 0 as well: TTFT on the shared-prefix workload 230-300 ms
  -> 450-660 ms. It shares the serving cores and spins while it waits for a
  step (vLLM's shared-memory queue), so at 0 it starves the router's
  tokenizing and hashing. It goes back to the serving processes' niceness
  once the engine has started (``settle``); while the engine loads, all its
  processes run at the model's niceness (``spawning_at``), so an engine
  starting on a core a running one binds is not starved (CI: 80 s to start).

The engine core's cores: where its rank workers run ahead of it, it is kept on their cores (``settle``).
Between two steps a rank worker spins on vLLM's shared-memory queue, on its own core, until the engine
core has scheduled the next one; left free to run on any core, the engine core waited behind the serving
processes and Ray's daemons on theirs, and one stream on the idle bench model stalled for 50-800 ms
several times a minute (2026-12-01, 2 cores, disaggregated: 0-10 gaps over 50 ms per 600 tokens, ITL
p99 37-75 ms; with the decode engine core on its rank's core: none in six streams, p99 19-30 ms). Beside
a rank at its own niceness it is not moved: there the spinning rank holds the core as long as the engine
core may, and steps took 15-25 % longer (the bench model alone, both at nice 0: one sequence 10.4-12.1
ms a step instead of 9.0-9.4). Nor where the ranks are bound no narrower than the replica (a GPU node).

So the model's processes are the leaves of the engine's process tree (less
``multiprocessing``'s resource trackers): the rank workers, or with a single
process (vLLM's uniprocessor executor on a GPU), the engine core itself.
Linux keeps a niceness per thread and a thread starts with its creator's;
they are set thread by thread once the engine has started (their
OpenMP threads exist by then: vLLM runs a warm-up step). Lowering a niceness
needs CAP_SYS_NICE (root outside a container) or a raised RLIMIT_NICE.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

from engine.errors import EngineConfigError

log = logging.getLogger(__name__)

DEFAULT_NICE = 0  # raw vLLM's: its server runs where it was started, as the client does


def can_lower_niceness() -> bool:
    """Whether this process holds CAP_SYS_NICE (bit 23 of CapEff): root in a container often does not."""
    status = open("/proc/self/status").read()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) & (1 << 23))


def descendants() -> set[int]:
    """Process ids below this process (what an engine being built adds to them is its own)."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def model_processes(pids: set[int]) -> set[int]:
    """The processes of an engine's tree (``pids``) that step the model: those with no child in the tree,
    leaving out the resource trackers that ``multiprocessing``'s spawn starts beside each parent."""
    engine, parents = set(), set()
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if "multiprocessing.resource_tracker" not in " ".join(process.cmdline()):
                engine.add(pid)
                parents.add(process.ppid())
        except psutil.NoSuchProcess:
            continue
    return engine - parents


@contextmanager
def spawning_at(nice: int | None) -> Iterator[None]:
    """Processes the calling thread starts meanwhile begin at ``nice`` (a process starts with its creator
    thread's niceness), where the OS allows lowering it: an engine starting beside a running one on a core
    they share (a pool grown past its planned cores) is otherwise starved while it loads by the running
    one's rank worker (measured in CI: 80 s instead of ~20 s). The thread gets its niceness back after."""
    target = DEFAULT_NICE if nice is None else nice
    thread = threading.get_native_id()
    own = os.getpriority(os.PRIO_PROCESS, thread)
    lowered = target < own and can_lower_niceness()
    if lowered:
        os.setpriority(os.PRIO_PROCESS, thread, target)
    try:
        yield
    finally:
        if lowered:
            os.setpriority(os.PRIO_PROCESS, thread, own)


def settle(pids: set[int], nice: int | None) -> None:
    """An engine's processes once started: its model processes at ``nice`` (``prioritize``), the rest (the
    engine core, resource trackers) back with the serving processes, at this process's niceness, and, where
    the model processes now run ahead of them, on the model processes' cores (``keep_on_model_cores``)."""
    serving_nice = os.getpriority(os.PRIO_PROCESS, os.getpid())  # the main thread's
    models = model_processes(pids)
    for pid in sorted(pids - models):
        for tid in _threads(pid):
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < serving_nice:
                    os.setpriority(os.PRIO_PROCESS, tid, serving_nice)  # raising a niceness is always allowed
            except ProcessLookupError:
                continue
    prioritize(models, nice)
    if models and all(_niceness(pid) < serving_nice for pid in models):  # the ranks run ahead of the rest
        keep_on_model_cores(pids - models, models)


def keep_on_model_cores(others: set[int], models: set[int]) -> None:
    """Every thread of ``others`` bound to the cores the ``models`` processes are bound to, together (a thread
    started later inherits its creator's). Ranks bound nowhere narrower than this process leave them as is."""
    try:
        cores = set().union(*(os.sched_getaffinity(pid) for pid in models))
    except ProcessLookupError:  # a rank gone already: the engine's start fails on its own
        return
    if not cores or cores >= os.sched_getaffinity(0):
        return
    for pid in sorted(others):
        for tid in _threads(pid):
            try:
                os.sched_setaffinity(tid, cores)
            except ProcessLookupError:
                continue


def prioritize(pids: set[int], nice: int | None) -> None:
    """Every thread of ``pids`` at ``nice`` (given), or lowered to ``DEFAULT_NICE`` where allowed (None).

    A niceness given that the OS refuses fails the engine's start, naming the field.
    """
    target = DEFAULT_NICE if nice is None else nice
    for pid in sorted(pids):
        for tid in _threads(pid):
            try:
                current = os.getpriority(os.PRIO_PROCESS, tid)
                if current == target or (nice is None and current < target):
                    continue
                os.setpriority(os.PRIO_PROCESS, tid, target)
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
            except PermissionError:
                if nice is not None:
                    raise EngineConfigError(
                        "nice",
                        f"the engine's model processes run at nice {current} and the OS refuses {nice} "
                        "(lowering a niceness needs CAP_SYS_NICE or a raised RLIMIT_NICE)",
                    ) from None
                log.warning(
                    "the engine's model processes stay at nice %d (lowering them to %d needs CAP_SYS_NICE): on a "
                    "CPU node they lose their cores to the serving processes; see README 'Engine processes and cores'",
                    current, target,
                )  # fmt: skip
                return


def _niceness(pid: int) -> int:
    """The process's main thread's (``prioritize`` sets every thread alike)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, pid)
    except ProcessLookupError:
        return 20  # gone: ahead of nothing


def _threads(pid: int) -> list[int]:
    try:
        return sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:  # the process ended meanwhile
        return []
