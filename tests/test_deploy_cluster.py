"""`ray up` to a serving cluster, end to end, with Ray's own launcher: deploy/cluster-local.yaml on nodes made here.

scripts/local_cluster.py makes a head and a worker (network namespaces running sshd, each with its
own home, /tmp and PID namespace); ``ray up`` runs the setup and start commands the cluster files
share with deploy/cluster-gpu.yaml (pdserve installed on each node, Redis with a password on the
head, Ray with its token); ``ray exec … serve deploy`` deploys deploy/serve-local-cluster.yaml from the
head; a client in the root namespace streams a completion over HTTP and a Generate over gRPC; ``ray
down`` stops it all, and no node has anything left running. The "laptop" ``ray up`` runs from has its
own HOME, holding the two secrets, as README's deploy section tells a user to make them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml
from helpers import transformers_greedy
from netns import why_not
from service_client import ServiceClient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from local_cluster import ClusterFile, LocalNodes  # noqa: E402

CLUSTER = "deploy/cluster-local.yaml"
SERVE = "~/pdserve/deploy/serve-local-cluster.yaml"
RAY = str(Path(sys.executable).with_name("ray"))
LAUNCH_TIMEOUT_S = 600  # ray up (both nodes' setup: the package installed on each) and serve deploy

REASON = why_not()
pytestmark = [
    pytest.mark.service,
    pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="openssh-server is not installed"),
    pytest.mark.timeout(1200),
]


def _ray(env: dict[str, str], *args: str, timeout: float = LAUNCH_TIMEOUT_S) -> str:
    done = subprocess.run([RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr  # `ray exec` prints the remote command's output among its own


def _laptop(home: Path) -> dict[str, str]:
    """Where `ray up` runs: its own HOME with Ray's token and the Redis password, made as README says."""
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PDSERVE_"))} | {"HOME": str(home)}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    (home / ".pdserve").mkdir(mode=0o700)
    secret = subprocess.run(["openssl", "rand", "-hex", "32"], check=True, capture_output=True, text=True).stdout
    (home / ".pdserve" / "redis-password").write_text(secret)
    (home / ".pdserve" / "redis-password").chmod(0o600)
    return env


def _until(condition, timeout_s: float, interval_s: float, failure) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, failure() if callable(failure) else failure
        time.sleep(interval_s)


def _alive_nodes(env: dict[str, str]) -> int:
    count = "import ray; ray.init(logging_level='ERROR'); print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))"
    found = re.search(r"alive nodes: (\d+)", _ray(env, "exec", CLUSTER, f'python -c "{count}"', timeout=120))
    return int(found[1]) if found else 0


def _health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as reply:
            return json.loads(reply.read())
    except OSError:
        return None


def _streamed_completion(url: str, prompt_ids: list[int], n: int) -> tuple[str, int]:
    body = {"prompt": prompt_ids, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    text, events = "", 0
    with urllib.request.urlopen(request, timeout=120) as reply:
        for line in reply:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
                events += 1
    return text, events


def test_ray_up_serves_http_and_grpc_from_the_local_cluster_and_ray_down_leaves_nothing_running(tmp_path):
    from pdserve.config import load_config
    from pdserve.models import resolve_model
    from router.tokenizer import ModelTokenizer

    cluster = ClusterFile.read(REPO / CLUSTER)
    nodes = LocalNodes(cluster=cluster)
    env = _laptop(tmp_path / "laptop")
    head = cluster.nodes[0]
    url, up = f"http://{head.ip}:8000", False
    started = time.monotonic()
    try:
        nodes.up()
        _ray(env, "up", "-y", "--no-config-cache", CLUSTER)
        up = True
        _until(lambda: _alive_nodes(env) == len(cluster.nodes), 300, 5, "the worker never joined")
        launched = time.monotonic()
        _ray(env, "exec", CLUSTER, f"serve deploy {SERVE}", timeout=120)
        _until(lambda: (h := _health(url)) is not None and h["live_workers"]["prefill"] and h["live_workers"]["decode"],
               LAUNCH_TIMEOUT_S, 2, "the app never became healthy")  # fmt: skip
        deployed = time.monotonic()

        model_dir = resolve_model(load_config(overrides={"model_cache_dir": str(tmp_path / "models")})).engine.model
        prompt_ids = ModelTokenizer(model_dir).encode("The cluster launcher brought this up")[:12]
        expected = transformers_greedy(model_dir, prompt_ids, 8)

        text, events = _streamed_completion(url, prompt_ids, 8)
        assert events >= 2  # streamed, not one body
        grpc_address = _router_address(env, nodes)
        client = ServiceClient(types.SimpleNamespace(http_url=url, grpc_address=grpc_address))
        try:
            tokens, grpc_text, _ = client.greedy(prompt_ids, 8)
        finally:
            client.close()
        assert tokens == expected
        assert text == grpc_text  # the same greedy answer over both front ends

        # The index is in the head's Redis, which answers only with the password, only on the private address.
        password = (tmp_path / "laptop" / ".pdserve" / "redis-password").read_text().strip()
        index = redis.Redis(host=head.ip, port=6380, db=1, password=password, socket_timeout=5)
        assert index.keys("pdserve:*")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=head.ip, port=6380, socket_timeout=5).ping()
        assert "Connection refused" in _ray(env, "exec", CLUSTER, "redis-cli -h 127.0.0.1 -p 6380 ping || true")
        served = time.monotonic()

        _ray(env, "down", "-y", CLUSTER, timeout=300)
        up = False
        leftovers: dict[str, list[str]] = {}

        def nothing_running() -> bool:
            leftovers.update({node.name: nodes.running(node) for node in cluster.nodes})
            return not any(leftovers.values())

        _until(nothing_running, 90, 1, lambda: f"left running after ray down: {leftovers}")  # stop-with-head.sh: 30 s
        print(f"\nray up + both nodes joined {launched - started:.0f} s, serve deploy to healthy "
              f"{deployed - launched:.0f} s, requests {served - deployed:.0f} s, ray down to nothing running "
              f"{time.monotonic() - served:.0f} s")  # fmt: skip
    finally:
        if up:
            subprocess.run([RAY, "down", "-y", CLUSTER], cwd=REPO, env=env, capture_output=True, timeout=300)
        nodes.down()


def _router_address(env: dict[str, str], nodes: LocalNodes) -> str:
    """gRPC is served by the router replica, on whichever node Serve placed it."""
    listing = _ray(env, "exec", CLUSTER, "serve status", timeout=120)
    assert "RUNNING" in listing
    for node in nodes.cluster.nodes:
        try:
            with socket_to(node.ip, 9000):
                return f"{node.ip}:9000"
        except OSError:
            continue
    raise AssertionError("no node serves gRPC on port 9000")


def socket_to(host: str, port: int):
    import socket

    return socket.create_connection((host, port), timeout=5)


def test_the_local_cluster_file_names_the_nodes_the_node_maker_makes():
    config = yaml.safe_load((REPO / CLUSTER).read_text())
    cluster = ClusterFile.read(REPO / CLUSTER)

    assert [n.ip for n in cluster.nodes] == [config["provider"]["head_ip"], *config["provider"]["worker_ips"]]
    assert cluster.ssh_private_key == REPO / config["auth"]["ssh_private_key"]
