"""The pdserve command, run as a user runs it: a real subprocess."""

import os
import subprocess
import sys

import pytest

PDSERVE = [sys.executable, "-m", "pdserve.cli"]


def run(*args, env=None, timeout=300):
    return subprocess.run([*PDSERVE, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("command", [[], ["make-model"], ["generate"], ["bench"], ["bench", "engine"]])
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: pdserve" in result.stdout


def test_make_model_refuses_an_unsupported_shape_with_a_clear_message(tmp_path):
    result = run("make-model", str(tmp_path / "m"), "--hidden-size", "120", "--heads", "4")
    assert result.returncode == 2
    assert "head_dim 30 is not supported" in result.stderr


def test_generate_reports_a_bad_config_field():
    result = run("generate", "--set", "engine.block_size=0", "hello")
    assert result.returncode == 2
    assert "engine.block_size" in result.stderr


@pytest.mark.engine
def test_generate_on_the_embedded_default_streams_the_greedy_completion(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {**os.environ, "PDSERVE_MODEL_CACHE_DIR": str(tmp_path)}
    prompt = "The quick brown fox"
    result = run(
        "generate",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--dtype",
        "float32",
        "--block-size",
        "32",
        "--max-model-len",
        "256",
        prompt,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "12 tokens" in result.stderr or "finish=stop" in result.stderr

    model_dir = tmp_path / "pdserve-tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer.encode(prompt)
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert result.stdout.rstrip("\n") == expected
