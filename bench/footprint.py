"""Memory and CPU of a whole local service while a benchmark runs: what a cluster's worth of replicas costs here.

``Footprint`` samples this process and every process under it (``pdserve up``'s local Ray: GCS, raylet,
Serve's controller and proxy, every replica, Redis) once a ``interval_s``: proportional set size (PSS, so
pages shared between forked processes count once), CPU time, and the time its threads were runnable but
waited for a core (the kernel's run-queue wait, ``/proc/PID/task/TID/schedstat``: what a process loses to
the others on its cores). Each process is put in a group, by default by its title: a Serve replica by its
deployment (``ray::ServeReplica:<app>:<Deployment>``), the rest as Ray's and the benchmark's own. The
summary is the peak total PSS, each group's PSS at that peak, the cores each group kept busy on average
(its CPU seconds over the wall time sampled) and the cores' worth of time its threads waited for one. A
thread that ends between two samples takes that interval's wait with it (not its CPU time: the kernel adds
an ended thread's to its process's).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import psutil

_REPLICA_TITLE = "ray::ServeReplica:"
_GIB = 1 << 30


def group_of(title: str) -> str:
    """``DecodeWorker`` for ``ray::ServeReplica:pdserve:DecodeWorker`` (Ray adds the method running, after a
    dot); ``ray`` for Ray's own; else ``other``."""
    if title.startswith(_REPLICA_TITLE):
        return title.removeprefix(_REPLICA_TITLE).split()[0].rsplit(":", 1)[-1].split(".")[0]
    if title.startswith("ray::") or "/ray/" in title or "gcs_server" in title or "raylet" in title:
        return "ray"
    return "other"


def by_title(process: psutil.Process) -> str:
    return group_of(title_of(process))


def title_of(process: psutil.Process) -> str:
    return " ".join(process.cmdline()) or process.name()


def run_queue_waits_s(pid: int) -> dict[int, float]:
    """Seconds each live thread of the process spent runnable, waiting for a core, by thread id."""
    waits = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stats:
                waits[int(tid)] = int(stats.read().split()[1]) / 1e9
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
    return waits


class Footprint:
    """A sampler thread over this process's tree; ``with Footprint() as f: ...`` then ``f.summary()``.
    ``grouping`` names each process's group (``by_title`` unless given). A sample also when it stops, so CPU
    and waits end there. Each sample reads every thread's schedstat, and, with ``memory``, every process's
    smaps (PSS): at 0.5 s over a local service that took a tenth of a core. Where the processes stay for
    the whole window, one sample at each end is enough (a long ``interval_s``) and memory can be left out."""

    def __init__(self, interval_s: float = 1.0, grouping: Callable[[psutil.Process], str] = by_title,
                 memory: bool = True):  # fmt: skip
        self._interval_s = interval_s
        self._grouping = grouping
        self._memory = memory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="pdserve-footprint", daemon=True)
        self._cpu_s: dict[int, tuple[str, float]] = {}  # pid → (group, its CPU seconds at its last sample)
        self._cpu_at_start: dict[int, float] = {}
        self._waits_s: dict[tuple[int, int], tuple[str, float, float]] = {}  # (pid, tid) → group, first, last
        self._peak: tuple[float, dict[str, float], int] = (0.0, {}, 0)  # total PSS, by group, replicas
        self._sampled_once = False
        self._began = self._ended = 0.0

    def __enter__(self) -> Footprint:
        self._began = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10 * self._interval_s + 5)
        self._ended = time.monotonic()

    def summary(self) -> dict:
        wall = max(self._ended - self._began, 1e-9)
        busy: dict[str, float] = defaultdict(float)
        waited: dict[str, float] = defaultdict(float)
        for pid, (group, cpu_s) in self._cpu_s.items():
            busy[group] += cpu_s - self._cpu_at_start[pid]
        for group, first_s, last_s in self._waits_s.values():
            waited[group] += last_s - first_s
        total, by_group, replicas = self._peak
        return {
            "peak_pss_gib": total / _GIB,
            "peak_pss_gib_by_group": {group: pss / _GIB for group, pss in sorted(by_group.items())},
            "replicas_at_peak": replicas,
            "cores_busy": sum(busy.values()) / wall,
            "cores_busy_by_group": {group: seconds / wall for group, seconds in sorted(busy.items())},
            "cores_waited_for_by_group": {group: seconds / wall for group, seconds in sorted(waited.items())},
            "sampled_s": wall,
        }

    def _sample_until_stopped(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self._interval_s):
                self._sample()
                return

    def _sample(self) -> None:
        me = psutil.Process(os.getpid())
        pss: dict[str, float] = defaultdict(float)
        replicas = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                with process.oneshot():
                    group, title = self._grouping(process), title_of(process)
                    cpu, pss_bytes = process.cpu_times(), process.memory_full_info().pss if self._memory else 0
                    waits = run_queue_waits_s(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, FileNotFoundError):
                continue
            pss[group] += pss_bytes
            replicas += title.startswith(_REPLICA_TITLE)
            cpu_s = cpu.user + cpu.system
            # a process there from the first sample spent CPU before the window; one born later, all inside it
            self._cpu_at_start.setdefault(process.pid, 0.0 if self._sampled_once else cpu_s)
            self._cpu_s[process.pid] = (group, cpu_s)
            for tid, wait_s in waits.items():  # and so for each thread's wait
                key = (process.pid, tid)
                first_s = self._waits_s[key][1] if key in self._waits_s else 0.0 if self._sampled_once else wait_s
                self._waits_s[key] = (group, first_s, wait_s)
        self._sampled_once = True
        total = sum(pss.values())
        if total > self._peak[0]:
            self._peak = (total, dict(pss), replicas)
