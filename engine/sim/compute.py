"""How a simulated step spends its time: asleep (the default), or as CPU time on the engine's cores.

Asleep, a step takes no CPU, so 32 simulated workers run on two cores and nothing else on the node slows
them: right for an engine whose compute happens elsewhere (a GPU's) and for the control plane at scale.
It is wrong where the simulator is checked against vLLM-CPU on the same small node (``pdserve bench
simulator``): there a real step is CPU time on the engine's cores, which it shares with whatever else runs
on them (on 2 cores, disaggregated, the prefill rank shares core 0 with the router and the replicas), so
it stretches while the serving processes are busy, and a sleeping step does not. Measured with sleeping
steps (2026-12-01): real TTFT p50 rose 122 → 181 ms from 0.5 to 1.5 requests/s, simulated 113 → 123.

On cores (``engine.simulated_compute: cores``), a process of the engine's own, bound to its ``cpu_cores``
at the niceness a vLLM rank worker gets there (``process_priority.prioritize``), spends each step: it spins
until it has had the step's time of CPU. Alone on its core that is the profile's time; beside busy
processes it takes longer, by as much as the kernel gives them. Between steps it spins a second longer, as a
vLLM rank does while it waits for the next one (``_WAIT_SPIN_S``), so what shares its cores pays for it as
beside a real engine. One spinning thread: a profile's time is a step's wall time on the engine's cores,
however many there are.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from engine.core_ledger import bound_cores
from engine.errors import EngineConfigError, EngineDeadError
from engine.process_priority import prioritize

if TYPE_CHECKING:  # the step process runs this module: it need not import pydantic for a type (~0.2 s)
    from engine.config import EngineConfig

_START_DEADLINE_S = 30.0  # the step process imports nothing heavy: seconds on a loaded node
_STEP_DEADLINE_FLOOR_S = 10.0  # a step on a core shared with busy processes may take many times its CPU time
_STEP_DEADLINE_FACTOR = 50
# Between steps a vLLM rank spins on its message queue, yielding the core at each turn, for a second after the
# last step it read before it sleeps on a socket (vLLM 0.32, distributed/device_communicators/shm_broadcast.py,
# SpinCondition's busy_loop_s). Measured here, random at 1.5 requests/s for 20 s: the prefill rank used 7.3
# CPU-s for ~2.3 s of steps, the decode rank 17.4 CPU-s; it takes that from whatever shares its core.
_WAIT_SPIN_S = 1.0


class Asleep:
    """A step waits its time and takes no CPU."""

    def spend(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        pass


class OnCores:
    """A step is ``seconds`` of CPU time, spent by a process bound to ``cores`` at ``nice``."""

    def __init__(self, cores: str | None, nice: int | None):
        self._process = subprocess.Popen(
            [sys.executable, "-m", "engine.sim.compute"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        try:
            if cores:
                os.sched_setaffinity(self._process.pid, bound_cores(cores))
            prioritize({self._process.pid}, nice)
            self._exchange(0.0, _START_DEADLINE_S)
        except EngineDeadError as exc:
            self.close()
            raise EngineConfigError("simulated_compute", f"the step process did not start: {exc}") from None
        except BaseException:
            self.close()
            raise

    def spend(self, seconds: float) -> None:
        self._exchange(seconds, max(_STEP_DEADLINE_FLOOR_S, _STEP_DEADLINE_FACTOR * seconds))

    def close(self) -> None:
        self._process.stdin.close()  # its end of file: the process returns
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._process.stdout.close()

    def _exchange(self, seconds: float, deadline_s: float) -> None:
        try:
            self._process.stdin.write(f"{seconds!r}\n".encode())
        except (BrokenPipeError, ValueError):
            raise EngineDeadError(f"the step process is gone (exit code {self._process.poll()})") from None
        ready, _, _ = select.select([self._process.stdout], [], [], deadline_s)
        if not ready:
            raise EngineDeadError(f"the step process took over {deadline_s:g} s for {1000 * seconds:.1f} ms of CPU")
        if self._process.stdout.read(1) != b"\n":
            raise EngineDeadError(f"the step process is gone (exit code {self._process.poll()})")


def compute_for(config: EngineConfig) -> Asleep | OnCores:
    if config.simulated_compute == "cores":
        return OnCores(config.cpu_cores, config.nice)
    return Asleep()


def _spend_steps() -> None:
    """The step process: for each line (seconds) spin until this thread has had that much CPU, then answer one
    newline; between steps, wait as a vLLM rank does (``_WAIT_SPIN_S``). End of input (the engine closed it, or
    its process died) ends it."""
    pending, last_step = b"", time.monotonic()
    while True:
        while b"\n" not in pending:
            if time.monotonic() - last_step < _WAIT_SPIN_S and not select.select([0], [], [], 0)[0]:
                os.sched_yield()
                continue
            chunk = os.read(0, 4096)  # past the spin: blocks until the next step
            if not chunk:
                return
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        until = time.thread_time() + float(line)
        while time.thread_time() < until:
            pass
        os.write(1, b"\n")
        last_step = time.monotonic()


if __name__ == "__main__":
    _spend_steps()
