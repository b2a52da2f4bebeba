"""pdserve against raw vLLM on the same model and machine, driven by the same outside client.

One invocation starts, one after the other: vLLM's own OpenAI server
(``python -m vllm.entrypoints.openai.api_server``, its defaults), ``pdserve up
--mode colocated`` and ``pdserve up`` (disaggregated), both on pdserve's
out-of-the-box defaults. Each gets the same two workloads from vLLM's ``bench
serve`` (scripts/vllm_bench_serve.py), streaming OpenAI completions with
``ignore_eos``:

- ``random``: 512 prompt tokens, 64 output tokens, 4 concurrent, 48 requests;
- ``prefix``: 8 prefixes of 1,024 tokens, 64-token suffixes, 32 output tokens.

Ratios are pdserve / raw vLLM, of output throughput and of the medians vLLM's
client reports (TTFT, ITL). Each server runs alone: no two share the cores.
The three run in turn, ``rounds`` times over, and each figure is the median of
its rounds: this machine's speed drifts by up to a quarter between minutes
(measured: one colocated service, 208 then 156 output tok/s ten minutes
apart), and interleaving puts the drift on all three alike. Each round's own
ratios are kept beside, to show their spread, with the cores each pdserve
worker's engine claimed in that round (the node's core ledger). Each
workload's figures also give the mean TTFT the server itself measured over
it (``server_ttft_mean_ms``: vLLM's ``vllm:time_to_first_token_seconds``,
pdserve's router's ``pdserve:time_to_first_token_seconds``; the client's adds
the HTTP front end around it), and for pdserve where that went: the means of
``pdserve:time_to_first_token_part_seconds`` (``ttft_<part>_mean_ms``, adding
up to it), so the worker's own share stands beside vLLM's whole; and the
share of prompt tokens each found in its prefix cache (``prefix_hit_rate``:
vLLM's ``vllm:prefix_cache_hits`` / ``_queries``, pdserve's
``pdserve:prefix_cache_hit_tokens`` / ``prompt_tokens``). And where the CPU went while each
workload ran (``cores``, beside the figures): for each role (vLLM's API server; pdserve's driver, Serve
replicas by deployment, Serve's proxy and controller, Ray's daemons; each server's engine cores and rank
workers; the client), the cores it kept busy and the cores' worth of time its threads waited for one
(``bench/footprint.py``), medians over the rounds.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.footprint import Footprint, group_of, title_of

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = {
    "random": ["--dataset-name", "random", "--random-input-len", "512", "--random-output-len", "64",
               "--num-prompts", "48", "--max-concurrency", "4"],
    "prefix": ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "1024",
               "--prefix-repetition-suffix-len", "64", "--prefix-repetition-num-prefixes", "8",
               "--prefix-repetition-output-len", "32", "--num-prompts", "32", "--max-concurrency", "4"],
}  # fmt: skip
TARGETS = {  # key → (bound, "min" or "max")
    "colocated_throughput_vs_vllm": (0.95, "min"),
    "colocated_itl_p50_vs_vllm": (1.1, "max"),
    "colocated_ttft_p50_vs_vllm": (1.1, "max"),
    "disagg_throughput_vs_vllm": (0.8, "min"),
    "disagg_itl_p50_vs_vllm": (1.1, "max"),
}


def run(model_dir: Path, json_dir: Path | None, port: int = 8000, kv_cache_gib: int = 1, rounds: int = 3) -> dict:
    if rounds < 1:
        raise ValueError(f"rounds: {rounds}; at least 1")
    name = model_dir.name
    rpc_dir = tempfile.TemporaryDirectory(prefix="pdserve-bench-vllm-")  # vLLM's ipc sockets, removed after
    servers = {  # the command, its env, and the pools /health must report live before the load starts
        "vllm": (*vllm_server(model_dir, port, kv_cache_gib, rpc_dir.name), {}),
        "colocated": (pdserve_up(model_dir, port, "colocated"), {}, {"decode": 1}),
        "disagg": (pdserve_up(model_dir, port, "disaggregated"), {}, {"prefill": 1, "decode": 1}),
    }
    per_round: list[dict[str, dict[str, dict[str, float]]]] = []  # round → server → workload → figures
    round_use: list[dict[str, dict[str, dict]]] = []  # round → server → workload → the Footprint's summary
    round_cores: list[dict[str, dict[str, list[int]]]] = []  # round → pdserve server → worker → cores
    with rpc_dir:
        for _ in range(rounds):
            per_round.append({})
            round_use.append({})
            round_cores.append({})
            for server, (command, env, pools) in servers.items():
                with Server(command, env, f"http://127.0.0.1:{port}", pools) as url:
                    if pools:
                        round_cores[-1][server] = claimed_cores()
                    per_round[-1][server], round_use[-1][server] = {}, {}
                    for workload, flags in WORKLOADS.items():
                        with Footprint(interval_s=5, grouping=role_of, memory=False) as use:
                            per_round[-1][server][workload] = _measure(url, name, model_dir, flags)
                        round_use[-1][server][workload] = use.summary()
    figures = {server: {w: _medians([one[server][w] for one in per_round]) for w in WORKLOADS} for server in servers}
    result = {
        "rounds": rounds, "figures": figures, **ratios(figures), "round_ratios": [ratios(one) for one in per_round],
        "round_figures": per_round, "round_cores": round_cores,
        "cores": {server: {w: cores_used([one[server][w] for one in round_use]) for w in WORKLOADS}
                  for server in servers},
        "workloads": {k: " ".join(v) for k, v in WORKLOADS.items()},
    }  # fmt: skip
    if json_dir is not None:
        json_dir.mkdir(parents=True, exist_ok=True)
        (json_dir / "vllm_compare.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def ratios(figures: dict) -> dict[str, float]:
    """pdserve / raw vLLM per mode and workload (suffix ``_prefix`` for the shared-prefix one)."""
    out = {}
    for mode in ("colocated", "disagg"):
        for workload, suffix in (("random", ""), ("prefix", "_prefix")):
            ours, theirs = figures[mode][workload], figures["vllm"][workload]
            for metric, key in (("output_throughput", "throughput"), ("median_itl_ms", "itl_p50"),
                                ("median_ttft_ms", "ttft_p50")):  # fmt: skip
                if theirs[metric]:
                    out[f"{mode}_{key}_vs_vllm{suffix}"] = round(ours[metric] / theirs[metric], 3)
    return out


def claimed_cores() -> dict[str, list[int]]:
    """The cores each engine on this node claimed, by the Serve deployment of the replica that claimed them
    (its process title, ``ray::ServeReplica:<app>:<deployment>``) and its pid."""
    import psutil

    from engine.core_ledger import CoreLedger

    named = {}
    for pid, cores in CoreLedger().claims().items():
        try:
            title = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        deployment = title.rpartition(":")[2].split()[0] if "ServeReplica" in title else "unknown"
        named[f"{deployment} {pid}"] = cores
    return named


def role_of(process: psutil.Process) -> str:
    """What a process under the benchmark is. By title: the client, vLLM's API server, pdserve's driver, a
    Serve replica by its deployment, Serve's proxy and controller, Ray's other processes. The engine core
    and rank workers by where they sit, as ``<server> engine core`` and ``<server> rank`` (under vLLM's API
    server or a replica: vLLM's process titles did not always take); multiprocessing's resource trackers
    and anything else as ``other``."""
    for depth, ancestor in enumerate([process, *process.parents()][:3]):
        title = title_of(ancestor)
        if "multiprocessing.resource_tracker" in title:
            return "other"
        role = role_by_title(title)
        if role is not None and (depth == 0 or role not in _STARTS_NO_ENGINE):
            return [role, f"{role} engine core", f"{role} rank"][depth]
    return "other"


_STARTS_NO_ENGINE = ("client", "pdserve up", "serve proxy", "serve controller", "ray", "other")


def role_by_title(title: str) -> str | None:
    """The role a title names, ``None`` for a title that does not (a process vLLM spawned)."""
    for marker, role in (("vllm_bench_serve", "client"), ("vllm.entrypoints.openai.api_server", "vllm api server"),
                         ("VLLM::APIServer", "vllm api server"), ("pdserve.cli up", "pdserve up"),
                         ("ray::ProxyActor", "serve proxy"), ("ray::ServeController", "serve controller")):  # fmt: skip
        if marker in title:
            return role
    if title.startswith("VLLM::") or "multiprocessing" in title:
        return None
    return group_of(title)


def cores_used(summaries: list[dict]) -> dict[str, dict[str, float]]:
    """Per role, the median over rounds of the cores it kept busy and the cores' worth of time it waited for
    one (0 in a round it did not appear)."""
    roles = sorted({role for one in summaries for role in one["cores_busy_by_group"]})
    keys = {"busy": "cores_busy_by_group", "waited_for": "cores_waited_for_by_group"}
    return {
        role: {name: round(statistics.median(one[key].get(role, 0.0) for one in summaries), 3)
               for name, key in keys.items()}
        for role in roles
    }  # fmt: skip


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def vllm_server(model_dir: Path, port: int, kv_cache_gib: int, rpc_dir: str) -> tuple[list[str], dict[str, str]]:
    """Raw vLLM's OpenAI server on its defaults: its command and env (``kv_cache_gib`` of KV, as pdserve's)."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", model_dir.name, "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    return command, {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_RPC_BASE_PATH": rpc_dir}


def pdserve_up(model_dir: Path, port: int, mode: str) -> list[str]:
    return [sys.executable, "-m", "pdserve.cli", "up", "--model", str(model_dir), "--mode", mode,
            "--http-port", str(port)]  # fmt: skip


def _measure(url: str, name: str, model_dir: Path, flags: list[str]) -> dict[str, float]:
    """The client's figures for one workload, and the server's own TTFT (and pdserve's parts) over it."""
    text = _metrics(url)
    before, hits_before = ttft_sums(text), prefix_hits(text)
    figures = _client(url, name, model_dir, flags)
    text = _metrics(url)
    for key, (total, count) in ttft_sums(text).items():
        total_before, count_before = before.get(key, (0.0, 0.0))
        figures[f"{key}_mean_ms"] = round(1000 * (total - total_before) / max(count - count_before, 1), 2)
    (hits, prompts), (hits_then, prompts_then) = prefix_hits(text), hits_before
    figures["prefix_hit_rate"] = round((hits - hits_then) / max(prompts - prompts_then, 1), 4)
    return figures


def prefix_hits(text: str) -> tuple[float, float]:
    """(prompt tokens found in a prefix cache, prompt tokens) so far, from vLLM's or pdserve's ``/metrics``."""
    hits = prompts = 0.0
    for name, _, value in _samples(text):
        if name in ("vllm:prefix_cache_hits_total", "pdserve:prefix_cache_hit_tokens_total"):
            hits += value
        elif name in ("vllm:prefix_cache_queries_total", "pdserve:prompt_tokens_total"):
            prompts += value
    return hits, prompts


def ttft_sums(text: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the TTFT a server measured (``server_ttft``; vLLM's or pdserve's router's) and of each
    of pdserve's parts of it (``ttft_<part>``), read from its ``/metrics``; vLLM's summed over its engines."""
    keys = {"pdserve:time_to_first_token_seconds": "server_ttft", "vllm:time_to_first_token_seconds": "server_ttft",
            "pdserve:time_to_first_token_part_seconds": "ttft_"}  # fmt: skip
    sums: dict[str, list[float]] = {}
    for name, labels, value in _samples(text):
        metric, _, suffix = name.rpartition("_")
        if metric in keys and suffix in ("sum", "count"):
            key = keys[metric] + labels.get("part", "")
            sums.setdefault(key, [0.0, 0.0])[suffix == "count"] += value
    return {key: (total, count) for key, (total, count) in sums.items()}


def _samples(text: str):
    """(name, labels, value) of every sample on a Prometheus text page."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        return reply.read().decode()


def _client(url: str, name: str, model_dir: Path, flags: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(REPO / "scripts" / "vllm_bench_serve.py"), "--backend", "openai",
                   "--base-url", url, "--model", name, "--tokenizer", str(model_dir), "--ignore-eos", "--seed", "0",
                   "--save-result", "--result-dir", out, "--result-filename", "result.json", *flags]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=1800)
        data = json.loads((Path(out) / "result.json").read_text())
    keys = ("completed", "output_throughput", "median_ttft_ms", "median_itl_ms", "median_tpot_ms", "p99_ttft_ms")
    return {key: data[key] for key in keys}


class Server:
    """A server process in its own session, ready once ``/health`` answers 200 with every pool in ``pools``
    live (pdserve's router answers before its workers are up); stopped with SIGINT, then SIGKILL."""

    def __init__(self, command: list[str], env: dict[str, str], url: str, pools: dict[str, int],
                 start_timeout_s: float = 600.0):  # fmt: skip
        self._command, self._env, self._url, self._timeout = command, env, url, start_timeout_s
        self._pools = pools

    @property
    def pid(self) -> int:
        return self._process.pid

    def __enter__(self) -> str:
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(self._command, env={**os.environ, **self._env}, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)  # fmt: skip
        try:
            self._wait_until_ready()
        except BaseException:  # a server that never became ready (or a Ctrl-C meanwhile) is stopped too
            self.__exit__()
            raise
        return self._url

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            if self._process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"{self._command[:4]} exited: {self._log.read()[-3000:].decode(errors='replace')}")
            try:
                with urllib.request.urlopen(self._url + "/health", timeout=5) as reply:
                    body = reply.read()
                live = json.loads(body).get("live_workers", {}) if self._pools else {}
                if all(live.get(pool, 0) >= count for pool, count in self._pools.items()):
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._command[:4]} did not answer in {self._timeout:g} s")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self._process.pid, signal.SIGINT)  # the whole session: what the server left running too
        except ProcessLookupError:
            pass
        try:
            self._process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(30)
        self._log.close()
