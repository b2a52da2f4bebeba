"""Every file in deploy/ validates against Ray's own schemas and pdserve's config, so none can rot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pdserve.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
FILES = sorted(DEPLOY.glob("*.yaml"))
SERVE_CONFIGS = [f for f in FILES if "applications" in yaml.safe_load(f.read_text())]
CLUSTER_FILES = [f for f in FILES if "cluster_name" in yaml.safe_load(f.read_text())]


def test_every_deploy_file_is_a_serve_config_or_a_cluster_file():
    assert FILES and set(FILES) == set(SERVE_CONFIGS) | set(CLUSTER_FILES)
    assert CLUSTER_FILES and len(SERVE_CONFIGS) >= 2


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_validate_against_the_serve_schema_and_pdserve_config(path):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.parse_obj(yaml.safe_load(path.read_text()))
    for app in schema.applications:
        assert app.import_path == "pdserve.app:app_builder"
        # The model directory lives on the cluster's nodes, not here: every other field is checked.
        args = {**app.args, "engine": {**app.args.get("engine", {}), "model": None}}
        config = load_config(data=args)  # raises ConfigError naming the field
        for pool in (config.service.prefill, config.service.decode, config.service.router):
            if pool.autoscaling_config is not None:
                from ray.serve.config import AutoscalingConfig

                AutoscalingConfig(**pool.autoscaling_config)
        for deployment in app.deployments or []:
            assert deployment.name in {"Router", "PrefillWorker", "DecodeWorker"}
        coordination = config.service.coordination
        assert app.autoscaling_policy == (coordination.serve_policy() if coordination else None)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_turn_serves_proxy_off_exactly_where_the_router_serves_http_itself(path):
    from pdserve.app import serve_ingress

    file = yaml.safe_load(path.read_text())
    args = file["applications"][0]["args"]
    config = load_config(data={**args, "engine": {**args.get("engine", {}), "model": None}})
    wanted = serve_ingress(config.service)
    assert {key: file.get(key) for key in ("proxy_location", "http_options")} == {
        "proxy_location": wanted["proxy_location"],
        "http_options": wanted.get("http_options"),
    }


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_files_validate_against_the_cluster_launcher_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))  # what `ray up` does: provider defaults filled in
    validate_config(config)
    assert any("pdserve" in command for command in config["setup_commands"])
    if config["provider"]["type"] != "local":  # the local provider has one node type: the head and its workers
        workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
        assert workers and all(t["max_workers"] >= t["min_workers"] for t in workers)


SHARED_CLUSTER_KEYS = (
    "file_mounts", "rsync_filter", "rsync_exclude", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip


def test_the_gpu_cluster_runs_the_setup_and_start_commands_the_local_cluster_proves():
    gpu, local = (yaml.safe_load((DEPLOY / name).read_text()) for name in ("cluster-gpu.yaml", "cluster-local.yaml"))

    assert {key: gpu.get(key) for key in SHARED_CLUSTER_KEYS} == {key: local.get(key) for key in SHARED_CLUSTER_KEYS}


def test_every_script_the_cluster_files_run_is_in_deploy():
    config = yaml.safe_load((DEPLOY / "cluster-gpu.yaml").read_text())
    commands = [command for key in SHARED_CLUSTER_KEYS[3:] for command in config[key]]
    scripts = [word.removeprefix("~/pdserve/") for c in commands for word in c.split() if word.endswith(".sh")]

    assert scripts and all((DEPLOY.parent / script).is_file() for script in scripts)


def test_the_gpu_cluster_runs_python_3_11_keeps_ray_s_token_and_the_dashboard_private():
    config = yaml.safe_load((DEPLOY / "cluster-gpu.yaml").read_text())
    head_start, worker_start = (
        " ".join(config[key]) for key in ("head_start_ray_commands", "worker_start_ray_commands")
    )

    assert "-py311-" in config["docker"]["image"] and config["docker"]["image"].startswith("rayproject/ray:2.60.0")
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_the_index_redis_has_its_own_port_a_password_and_the_head_s_private_address():
    cluster = yaml.safe_load((DEPLOY / "cluster-gpu.yaml").read_text())
    start_redis = (DEPLOY / "start-redis.sh").read_text()
    serve = yaml.safe_load((DEPLOY / "serve-gpu.yaml").read_text())["applications"][0]["args"]["router"]["index"]

    assert "--port=6379" in " ".join(cluster["head_start_ray_commands"]) and "port 6380" in start_redis
    assert "requirepass" in start_redis and "bind $ip" in start_redis
    assert serve["redis_url"] == "redis://${RAY_HEAD_IP}:6380/1"  # the head's address where each replica runs
    assert serve["redis_password_file"] == "~/.pdserve/redis-password"
    assert cluster["file_mounts"]["~/.pdserve/redis-password"] == "~/.pdserve/redis-password"


def test_the_gpu_serve_config_sets_the_gpu_engine_settings_and_no_cpu_only_one():
    args = yaml.safe_load((DEPLOY / "serve-gpu.yaml").read_text())["applications"][0]["args"]
    engine = load_config(data={**args, "engine": {**args["engine"], "model": None}}).engine

    assert {"gpu_memory_utilization", "tensor_parallel_size", "kv_cache_dtype"} <= set(args["engine"])
    assert engine.gpu_memory_utilization == 0.9 and engine.tensor_parallel_size == 1
    assert "kv_cache_gib" not in args["engine"]
    assert all("kv_cache_gib" not in args["service"][pool] for pool in ("prefill", "decode"))


def test_a_broken_serve_config_is_caught():
    from ray.serve.schema import ServeDeploySchema

    with pytest.raises(Exception, match="route_prefix"):
        ServeDeploySchema.parse_obj({"applications": [{"import_path": "pdserve.app:app_builder", "route_prefix": 7}]})


# A shell's background job (how CI runners often start the suite) ignores SIGINT, an ignored signal stays
# ignored across exec, and Python then never raises KeyboardInterrupt: `serve run` would sleep through the
# Ctrl-C this test sends. A user's terminal gives it SIGINT at its default; so does this.
WITH_SIGINT_AS_A_TERMINAL_GIVES_IT = [
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
]  # fmt: skip


@pytest.mark.service
def test_the_local_serve_config_runs_under_serve_run(tmp_path):
    from pdserve.local_redis import free_port

    config = yaml.safe_load((DEPLOY / "serve-local-cpu.yaml").read_text())
    http_port, grpc_port = free_port(), free_port()  # the file's own ports, moved off the defaults
    config["applications"][0]["args"]["service"].update(http_port=http_port, grpc_port=grpc_port)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    # Unbuffered: a hang's log ends where serve run stopped, not where its buffer was last written out.
    env = {**os.environ, "PDSERVE_MODEL_CACHE_DIR": str(tmp_path / "models"), "PYTHONUNBUFFERED": "1"}
    serve_cli = Path(sys.executable).parent / "serve"
    log_path = tmp_path / "serve-run.log"  # what serve run said, for a failure's message
    with log_path.open("wb") as log:
        process = subprocess.Popen([*WITH_SIGINT_AS_A_TERMINAL_GIVES_IT, serve_cli, "run", str(path)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def said() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"serve run exited:\n{said()}"
            assert time.monotonic() < deadline, f"the app never became healthy:\n{said()}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                    live = json.loads(reply.read())["live_workers"]
                if live["prefill"] and live["decode"]:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())
        assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["finish_reason"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            stacks = _python_stacks(process.pid)
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"serve run did not exit within 120 s of SIGINT:\n{said()}\n{stacks}") from None


def _python_stacks(pid: int) -> str:
    """Where a hung process waits: every thread's Python and native stack (py-spy), for a failure's message."""
    py_spy = Path(sys.executable).parent / "py-spy"
    try:
        command = [py_spy, "dump", "--native", "--pid", str(pid)]
        dump = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(no stacks: {exc!r})"
    return dump.stdout + dump.stderr
