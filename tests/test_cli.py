"""The pdserve command, run as a user runs it: a real subprocess."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading

import pytest
import yaml

PDSERVE = [sys.executable, "-m", "pdserve.cli"]


def run(*args, env=None, timeout=300):
    return subprocess.run([*PDSERVE, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["up"],
        ["generate"],
        ["status"],
        ["make-model"],
        ["bench"],
        ["bench", "engine"],
        ["bench", "serve"],
        ["bench", "compare"],
        ["bench", "questions"],
        ["bench", "overhead"],
        ["bench", "autoscale"],
        ["bench", "vllm"],
        ["serve-config"],
    ],
)
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: pdserve" in result.stdout


def test_make_model_refuses_an_unsupported_shape_with_a_clear_message(tmp_path):
    result = run("make-model", str(tmp_path / "m"), "--hidden-size", "120", "--heads", "4")
    assert result.returncode == 2
    assert "head_dim 30 is not supported" in result.stderr


def test_serve_config_writes_a_serve_config_with_the_coordinated_policy_and_no_secret():
    from ray.serve.schema import ServeDeploySchema

    scaled = ["--set", "service.prefill.autoscaling={}", "--set", "service.decode.autoscaling={}"]
    secrets = ["--set", "cluster_token=s3cret-token", "--set", "router.api_keys=[s3cret-key]"]
    result = run("serve-config", *scaled, "--set", "service.coordination={ratio_slack: 3}", *secrets)
    assert result.returncode == 0, result.stderr
    schema = ServeDeploySchema.model_validate(yaml.safe_load(result.stdout))
    app = schema.applications[0]
    assert app.import_path == "pdserve.app:app_builder"
    assert app.autoscaling_policy["policy_function"] == "pdserve.autoscaling:CoordinatedPolicy"
    assert app.autoscaling_policy["policy_kwargs"] == {"ratio_slack": 3.0}
    assert "s3cret" not in result.stdout


def test_autoscale_on_the_simulated_engine_refuses_the_vllm_traces_flags():
    result = run("bench", "autoscale", "--engine", "simulated", "--high-rate", "3", "--max-replicas", "4")
    assert result.returncode == 2
    assert "--high-rate, --max-replicas: the simulated engine runs its own trace" in result.stderr


def test_the_router_benchmarks_engine_without_the_service_is_refused():
    result = run("bench", "router", "--engine", "simulated")
    assert result.returncode == 2 and "--engine: it picks the service's engine, so it needs --service" in result.stderr


def test_autoscale_refuses_a_rate_of_zero():
    result = run("bench", "autoscale", "--low-rate", "0")
    assert result.returncode == 2 and "must be positive" in result.stderr


def test_the_layers_benchmark_refuses_too_few_requests_to_take_a_median_of():
    result = run("bench", "layers", "--requests", "3")
    assert result.returncode == 2 and "--requests 3 --rounds 2: at least 10 requests and 1 round" in result.stderr


@pytest.mark.parametrize("suite", ["vllm", "layers"])
def test_the_benchmarks_against_raw_vllm_refuse_an_engine_setting_their_pdserve_up_would_not_get(suite):
    result = run("bench", suite, "--dtype", "float32")
    assert result.returncode == 2 and "unrecognized arguments: --dtype float32" in result.stderr


def test_the_transfer_benchmark_on_a_gpu_is_refused_where_there_is_none():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the GPU arm would run")
    result = run("bench", "transfer", "--no-handoff", "--device", "cuda")
    assert result.returncode == 2 and "--device cuda: no CUDA device here" in result.stderr


def test_placement_refuses_a_pool_of_no_workers():
    result = run("bench", "placement", "--decode-workers", "0")
    assert result.returncode == 2 and "--prefill-workers and --decode-workers must be at least 1" in result.stderr


def test_generate_reports_a_bad_config_field():
    result = run("generate", "--local", "--set", "engine.block_size=0", "hello")
    assert result.returncode == 2
    assert "engine.block_size" in result.stderr


@pytest.mark.engine
def test_generate_on_the_embedded_default_streams_the_greedy_completion(tmp_path):
    """In float32, so that the tokens are exactly transformers'; eager, as compiling costs ~30 s here and the
    compiled default runs in every test of `pdserve up` (below, test_package, test_service_defaults)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {**os.environ, "PDSERVE_MODEL_CACHE_DIR": str(tmp_path), "PDSERVE_ENGINE__ENFORCE_EAGER": "true"}
    prompt = "The quick brown fox"
    result = run(
        "generate",
        "--local",
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


@pytest.mark.engine
def test_generate_local_in_eager_mode_answers_prompts_of_1_to_4_tokens(tmp_path):
    """Issue #17: `dtype: auto` (bfloat16 here) with `enforce_eager` died of SIGILL on these (exit 132). The
    defaults compile now (the short prompts on them: test_service_defaults.py); eager is one setting away."""
    from transformers import AutoTokenizer

    from pdserve.config import load_config
    from pdserve.models import resolve_model

    model_dir = resolve_model(load_config(overrides={"model_cache_dir": str(tmp_path)})).engine.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # what the local engine prompts with
    words = ("a", "hi", "hello", "dragon", "world", "Once upon a time")
    by_length = {}
    for word in words:
        by_length.setdefault(len(tokenizer.encode(word)), word)
    assert {1, 2, 3, 4} <= by_length.keys(), by_length
    env = {**os.environ, "PDSERVE_MODEL_CACHE_DIR": str(tmp_path), "PDSERVE_ENGINE__ENFORCE_EAGER": "true"}
    result = run("generate", "--local", "--max-tokens", "4", *(by_length[n] for n in (1, 2, 3, 4)), env=env)
    assert result.returncode == 0, (by_length, result.returncode, result.stderr[-2000:])
    answers = re.findall(r"\[(\d+) prompt tokens, (\d+) tokens, finish=(\w+)", result.stderr)
    assert [int(prompt) for prompt, _, _ in answers] == [1, 2, 3, 4], result.stderr[-2000:]
    assert all(tokens == "4" or finish == "stop" for _, tokens, finish in answers), answers


def test_generate_without_a_running_service_says_unavailable():
    from pdserve.local_redis import free_port

    result = run("generate", "--address", f"127.0.0.1:{free_port()}", "hello", timeout=60)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


@pytest.mark.service
def test_up_answers_over_both_apis_serves_generate_and_status_and_stops_quietly_on_ctrl_c(tmp_path):
    from pdserve.local_redis import free_port

    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PDSERVE_MODEL_CACHE_DIR": str(tmp_path)}
    up = subprocess.Popen(
        [*PDSERVE, "up", "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--try", "Once upon a time"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in up.stdout], daemon=True)
    reader.start()
    seen = []
    try:
        while not any("serving until Ctrl-C" in line for line in seen):
            try:
                seen.append(lines.get(timeout=300))
            except queue.Empty:
                pytest.fail("pdserve up was not serving after 300 s; it said:\n" + "".join(seen)[-4000:])
        output = "".join(seen)
        assert "pdserve: prefill: TP=1" in output and "pdserve: decode: TP=1" in output  # the layout it chose
        assert f"gRPC 127.0.0.1:{grpc_port}" in output and "gRPC  Generate: 'Once upon a time' →" in output
        assert "HTTP  /v1/completions: 'Once upon a time' →" in output
        address = f"127.0.0.1:{grpc_port}"
        result = run("generate", "--address", address, "--temperature", "0", "--max-tokens", "8", "Hello", timeout=120)
        assert result.returncode == 0 and "8 tokens" in result.stderr, result.stderr
        status = run("status", "--address", address, timeout=60)
        assert status.returncode == 0 and "prefill" in status.stdout and "decode" in status.stdout
        bound = [line.split()[-1] for line in status.stdout.splitlines() if line.startswith(("prefill", "decode"))]
        assert len(bound) == 2 and all(cores != "-" for cores in bound), status.stdout  # each replica's cores
        if len(os.sched_getaffinity(0)) >= 2:
            assert bound[0] != bound[1], status.stdout  # never the same cores
        bench = run(
            "bench",
            "serve",
            "--url",
            f"http://127.0.0.1:{http_port}",
            "--requests",
            "4",
            "--rate",
            "8",
            "--output-tokens",
            "4",
            "--input-tokens",
            "40",
            "--out",
            str(tmp_path / "bench"),
            timeout=120,
        )
        assert bench.returncode == 0, bench.stderr
        assert "requests (errors)" in bench.stdout and (tmp_path / "bench" / "records.json").exists()
        outside = subprocess.run(  # an established client: vLLM's own benchmark, over the OpenAI API
            [sys.executable, "scripts/vllm_bench_serve.py", "--backend", "openai", "--base-url",
             f"http://127.0.0.1:{http_port}", "--model", "pdserve-tiny-llama", "--tokenizer",
             str(tmp_path / "pdserve-tiny-llama"), "--dataset-name", "random", "--random-input-len", "32",
             "--random-output-len", "4", "--num-prompts", "4", "--ignore-eos"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert outside.returncode == 0, outside.stderr[-2000:]
        assert re.search(r"Successful requests:\s+4", outside.stdout), outside.stdout[-2000:]
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(120) == 0
    reader.join(timeout=10)
    seen += [lines.get_nowait() for _ in range(lines.qsize())]
    notices = [line for line in seen if "(raylet)" in line or "Token authentication is enabled" in line]
    assert notices == [], "".join(seen)[-4000:]  # Ray's retry notices at Serve's shutdown, its auth default
