"""pdserve's vLLM general plugin: run by vLLM in every process it starts, before any model code.

Registered as a ``vllm.general_plugins`` entry point (pyproject.toml); vLLM loads
those in its front end, its engine core and each of its worker processes.

- AMX tile permission (engine/cpu_isa.py): without it, vLLM's bfloat16 CPU
  attention dies of SIGILL on 1–4-token prompts.
- Die with the parent: vLLM's engine core does not watch the process that
  started it (vLLM 0.32; its workers do watch the engine core). When a Serve
  replica is SIGKILLed (the OOM killer, a fault), its engine core and workers
  would live on, holding their memory, KV pool and cores. A child of
  ``multiprocessing`` asks the kernel for SIGKILL when its parent goes.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import platform
import signal

from engine.cpu_isa import request_amx_permission

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """In a process ``multiprocessing`` started: be killed when the parent dies; true where it applies."""
    parent = multiprocessing.parent_process()
    if parent is None or platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent.pid:  # the parent died before the request: nobody would send the signal
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def register() -> None:
    request_amx_permission()
    die_with_parent()
