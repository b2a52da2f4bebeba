"""AMX tile permission, asked in every process vLLM starts (issue #17: bfloat16 + 1–4-token prompts → SIGILL)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from engine.cpu_isa import AmxPermission, cpu_reports_amx, request_amx_permission


def test_the_permission_request_is_a_vllm_general_plugin_so_every_vllm_process_runs_it():
    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "pdserve"]
    assert plugin.value == "engine.vllm_plugin:register"
    loaded = subprocess.run(
        [sys.executable, "-c", "from vllm.plugins import load_plugins_by_group as load; "
                               "print(sorted(load('vllm.general_plugins')))"],  # fmt: skip
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "'pdserve'" in loaded.stdout, loaded.stderr[-2000:]


def test_the_cpu_flags_say_whether_amx_is_there(tmp_path):
    with_amx, without = tmp_path / "amx", tmp_path / "plain"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_reports_amx(with_amx) and not cpu_reports_amx(without)


def test_this_machine_gets_the_permission_it_needs():
    """Granted on an AMX CPU; nothing to ask elsewhere (this CI machine: an AMD EPYC without AMX)."""
    want = AmxPermission.GRANTED if cpu_reports_amx() else AmxPermission.NOT_APPLICABLE
    assert request_amx_permission() is want
    assert request_amx_permission() is want  # asking again is harmless
