"""A benchmark's engine side runs in a fresh process of its own (bench/engine_process.py)."""

from __future__ import annotations

import multiprocessing

import pytest

from bench.engine_process import call_in_fresh_process


def _start_a_child() -> int:
    child = multiprocessing.get_context("spawn").Process(target=int)  # as vLLM starts its engine core
    child.start()
    child.join(30)
    return child.exitcode


def _refuse(field: str) -> None:
    raise ValueError(f"{field}: refused")


def test_the_process_may_start_children_as_vllm_does():
    assert call_in_fresh_process(_start_a_child, timeout_s=60) == 0


def test_an_error_in_the_process_is_raised_in_the_caller():
    with pytest.raises(ValueError, match="engine.cpu_cores: refused"):
        call_in_fresh_process(_refuse, "engine.cpu_cores", timeout_s=60)
