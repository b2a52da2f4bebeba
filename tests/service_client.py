"""Helpers for the tests that run the whole service on a real local Ray cluster."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc

from pdserve.config import PdserveConfig, load_config
from pdserve.local_redis import free_port
from pdserve_pb.v1 import generate_pb2 as pb
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc

BLOCK = 32
LONG = 40  # prompts with more uncached tokens than this are disaggregated


def service_config(model_dir: Path, cache_dir: Path, **overrides) -> PdserveConfig:
    # float32: tokens equal transformers'. Eager: seconds per engine start, not a compile: these services test the
    # request path, not kernels; the defaults (bfloat16, compiled) are served in test_service_defaults.py,
    # test_service_poison.py and test_cli.py. The simulated engine takes neither (they are vLLM's).
    vllm_only = {"engine.dtype": "float32", "engine.enforce_eager": True}
    settings = {
        "engine.model": str(model_dir),
        **(vllm_only if overrides.get("engine.kind", "vllm") == "vllm" else {}),
        "engine.block_size": BLOCK,
        "engine.num_kv_blocks": 160,
        "engine.max_model_len": 1024,
        "model_cache_dir": str(cache_dir),
        "service.http_port": free_port(),
        "service.grpc_port": free_port(),
        "service.heartbeat_s": 0.2,
        "router.index.heartbeat_ttl_s": 2.0,
        "router.placement.local_prefill_max_uncached_tokens": LONG,
        **overrides,
    }
    return load_config(overrides=settings)


def prompt(n: int, offset: int = 0) -> list[int]:
    return [(offset * 7919 + i * 31) % 1000 + 2 for i in range(n)]


def simulated_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    """The simulated engine's greedy tokens for ``ids``: a function of the context (engine/sim/tokens.py)."""
    from engine.sim.tokens import Continuation

    continuation = Continuation(ids, 0, json.loads((model_dir / "config.json").read_text())["vocab_size"])
    return [continuation.next_token() for _ in range(n)]


class _WithKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call, as an API-key client would."""

    def __init__(self, key: str):
        self._metadata = ("authorization", f"Bearer {key}")

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class ServiceClient:
    def __init__(self, service, api_key: str | None = None):
        self.http_url = service.http_url
        self.raw_channel = grpc.insecure_channel(service.grpc_address)
        self.channel = grpc.intercept_channel(self.raw_channel, _WithKey(api_key)) if api_key else self.raw_channel
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def generate(self, ids_or_text, timeout: float = 120, request_id: str = "", **sampling):
        """The whole stream: (token ids, text, last message)."""
        request = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling))
        if isinstance(ids_or_text, str):
            request.text = ids_or_text
        else:
            request.token_ids.ids.extend(ids_or_text)
        replies = list(self.stub.Generate(request, timeout=timeout))
        return [t for r in replies for t in r.token_ids], "".join(r.text for r in replies), replies[-1]

    def greedy(self, ids, n: int = 12):
        return self.generate(ids, max_tokens=n, temperature=0.0, ignore_eos=True)

    def greedy_into(self, ids: list[int], n: int, into: list, timeout: float = 240) -> None:
        """The greedy stream's messages appended to ``into`` as they come: another thread sees how far it got."""
        sampling = pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        for reply in self.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling),
                                        timeout=timeout):  # fmt: skip
            into.append(reply)

    def status(self) -> pb.StatusResponse:
        return self.stub.Status(pb.StatusRequest(), timeout=10)

    def post(self, path: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
        return self.post_raw(path, json.dumps(body).encode(), timeout)

    def post_raw(self, path: str, data: bytes, timeout: float = 120, headers: dict | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", **self.headers, **(headers or {})}
        request = urllib.request.Request(self.http_url + path, data, headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, {"error": {"message": text.decode(errors="replace")}}

    def open_stream(self, body: dict, path: str = "/v1/completions", stream: bool = True):
        """A request sent and left open (SSE unless ``stream`` is false); ``getresponse()`` waits for it,
        ``close()`` is a client gone."""
        url = urllib.parse.urlparse(self.http_url)
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        headers = {"Content-Type": "application/json", **self.headers}
        connection.request("POST", path, json.dumps({**body, "stream": stream}), headers)
        return connection

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(self.http_url + path, headers=self.headers), timeout=30
            ) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metric(self, name: str, **labels) -> float:
        """The sum of a Prometheus sample over series matching ``labels``."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.decode().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            series, _, value = line.rpartition(" ")
            if all(f'{key}="{val}"' in series for key, val in labels.items()):
                total += float(value)
        return total

    def wait_idle(self, timeout_s: float) -> float:
        """Seconds until every worker reports no running request and no KV block in use."""
        start = time.monotonic()
        while True:
            status = self.status()
            busy = [w for w in status.workers if w.running_seqs or w.waiting_seqs or w.kv_used_fraction > 0]
            if not busy and status.requests_running == 0:
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"not idle after {timeout_s} s: {busy}, running {status.requests_running}")
            time.sleep(0.05)

    def close(self) -> None:
        self.raw_channel.close()


def sse_data(connection, into: list[bytes]) -> None:
    """Append each ``data:`` payload of an open SSE response (``ServiceClient.open_stream``) as it arrives."""
    for line in connection.getresponse():
        if line.startswith(b"data: "):
            into.append(line[6:].strip())
