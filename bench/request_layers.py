"""Where one short request's time goes: pdserve's serving path layer by layer, beside raw vLLM's server.

Every figure is the median time to the first token of a lone request (a 2-token prompt, 1 output
token, greedy), sent one after another, so no queueing is in it, only fixed cost per request:

- ``vllm_http_ms``: raw vLLM's OpenAI server, a streamed completion over HTTP;
- ``router_http_ms``: ``pdserve up --mode colocated`` (its defaults), the same completion through the router;
- ``decode_handle_ms``: the same running service, a Serve handle call straight into its DecodeWorker
  from a driver on its cluster (the router's share is the difference from ``router_http_ms``);
- ``serve_hop_ms``: a Serve deployment that yields its argument, on the same cluster: Serve's own cost of
  one streamed call (a replica at Ray's worker niceness, as the DecodeWorker);
- ``engine_alone_ms``: pdserve's engine (``Engine.generate``) in a process of its own, on the cores the
  service's decode engine claimed, with nothing else running.

``replica_ms`` = ``decode_handle_ms`` - ``serve_hop_ms`` - ``engine_alone_ms``: what the DecodeWorker's
process adds around the engine (its threads, its niceness, the hop from the engine's loop to Serve's).
Servers run one after the other, each alone; ``rounds`` alternate them against this machine's drift.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.engine_process import call_in_fresh_process
from bench.vllm_compare import Server, claimed_cores, pdserve_up, vllm_server
from engine.types import DecodeJob, GenerateRequest, SamplingOptions

PROMPT_IDS = [1, 2015]  # BOS and one token: nothing for the engine to compute but a step
CALL_TIMEOUT_S = 30.0  # one lone request, whichever layer: far more than it takes


def run(
    model_dir: Path, json_dir: Path | None, port: int = 8000, requests: int = 60, rounds: int = 2, kv_cache_gib: int = 1
) -> dict:
    name, url = model_dir.name, f"http://127.0.0.1:{port}"
    per_round = []
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-layers-") as rpc_dir:
        for _ in range(rounds):
            figures = {}
            with Server(*vllm_server(model_dir, port, kv_cache_gib, rpc_dir), url, {}):
                figures["vllm_http_ms"] = asyncio.run(_median_ms(lambda: _over_http(port, name), requests))
            with Server(pdserve_up(model_dir, port, "colocated"), {}, url, {"decode": 1}):
                cores = next(c for worker, c in claimed_cores().items() if worker.startswith("DecodeWorker"))
                figures["router_http_ms"] = asyncio.run(_median_ms(lambda: _over_http(port, name), requests))
                figures.update(call_in_fresh_process(_on_the_cluster, requests))  # a driver of this round's cluster
            figures["engine_alone_ms"] = call_in_fresh_process(_engine_alone, str(model_dir), cores, requests)
            figures["replica_ms"] = figures["decode_handle_ms"] - figures["serve_hop_ms"] - figures["engine_alone_ms"]
            figures["router_ms"] = figures["router_http_ms"] - figures["decode_handle_ms"]
            per_round.append({k: round(v, 2) for k, v in figures.items()})
            print(f"round {len(per_round)}: {per_round[-1]}", file=sys.stderr, flush=True)
    result = {
        **{key: round(statistics.median(r[key] for r in per_round), 2) for key in per_round[0]},
        "rounds": per_round, "requests": requests, "prompt_ids": PROMPT_IDS, "decode_cores": cores,
    }  # fmt: skip
    if json_dir is not None:
        json_dir.mkdir(parents=True, exist_ok=True)
        (json_dir / "request_layers.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


async def _median_ms(time_one, requests: int) -> float:
    """The median of ``requests`` timings by ``time_one`` (a coroutine function, ms), after a tenth as many
    as warm-up."""
    for _ in range(requests // 10):
        await time_one()
    return statistics.median([await time_one() for _ in range(requests)])


async def _first_item_ms(open_stream) -> float:
    """Milliseconds to the first item of the stream ``open_stream()`` opens; read to its end, under a deadline."""
    started, first = time.perf_counter(), None
    async with asyncio.timeout(CALL_TIMEOUT_S):
        async for _ in open_stream():
            if first is None:
                first = (time.perf_counter() - started) * 1000
    return first


def _request() -> GenerateRequest:
    return GenerateRequest(f"bench-layers-{time.monotonic_ns()}", PROMPT_IDS, SamplingOptions(max_tokens=1))


async def _over_http(port: int, model: str) -> float:
    return await asyncio.to_thread(_http_first_token, port, model)


def _http_first_token(port: int, model: str) -> float:
    body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": 1, "temperature": 0, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT_S)
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"completion answered {reply.status}: {reply.read()[:300]!r}")
        first = None
        for line in reply:
            if first is None and line.startswith(b"data: {"):
                first = (time.perf_counter() - started) * 1000
        if first is None:
            raise RuntimeError("the stream carried no token")
        return first
    finally:
        connection.close()


def _on_the_cluster(requests: int) -> dict[str, float]:
    """``decode_handle_ms`` and ``serve_hop_ms``, from a driver attached to the running service's cluster."""
    import logging

    import ray
    from ray import serve

    from pdserve.up import deploy

    @serve.deployment(name="Echo", ray_actor_options={"num_cpus": 0})  # the service holds every logical CPU
    class Echo:
        async def generate(self, value):
            yield value

    ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
    try:
        decode = serve.get_deployment_handle("DecodeWorker", "pdserve").options(stream=True)
        deploy(Echo.bind(), "pdserve-bench-echo", 120, route_prefix=None)  # it goes with the service
        echo = serve.get_app_handle("pdserve-bench-echo").options(stream=True)

        async def timed() -> dict[str, float]:
            return {
                "decode_handle_ms": await _median_ms(
                    lambda: _first_item_ms(lambda: decode.generate.remote(DecodeJob(_request()))), requests
                ),
                "serve_hop_ms": await _median_ms(lambda: _first_item_ms(lambda: echo.generate.remote(1)), requests),
            }

        return asyncio.run(timed())
    finally:
        ray.shutdown()


def _engine_alone(model: str, cores: list[int], requests: int) -> float:
    from engine.config import EngineConfig
    from engine.engine import Engine

    engine = Engine(EngineConfig(model=model, cpu_cores=",".join(map(str, cores))))  # one rank, as the service's
    try:
        return asyncio.run(_median_ms(lambda: _first_item_ms(lambda: engine.generate(_request())), requests))
    finally:
        engine.shutdown()
