"""Soak: a bounded mixed load on a running pdserve, with the memory of every process watched.

``clients`` closed-loop clients send, until ``duration_s`` is up, a mix of what
real traffic holds: prompts of random length or on one of a few shared
prefixes, HTTP (SSE or whole) and gRPC, and cancels at random points (a share
``cancel_share`` of requests, HTTP disconnects and gRPC cancels). Every
request either completes or is cancelled on purpose; anything else is an
error, a cancelled request's included (it is read up to its cancel point, and
how it ended there is tallied: before its first token, mid-stream, or done
first). The resident memory (RSS) of every process of the service (each Serve
replica, proxy and controller) is sampled all along; the run passes when there
are no errors, no process grew by ``max_rss_growth`` or more after
``warmup_s`` (``rss_growth``), and every KV pool is back to its baseline once
the load stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx

from pdserve_pb.v1 import generate_pb2 as pb
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc

SHARED_PREFIXES = 4
SERVE_ACTORS = ("SERVE_REPLICA::", "SERVE_PROXY_ACTOR", "SERVE_CONTROLLER_ACTOR")


@dataclass(frozen=True)
class SoakSpec:
    clients: int = 8
    duration_s: float = 600.0
    warmup_s: float = 60.0
    cancel_share: float = 0.2
    max_tokens: int = 48
    max_prompt_tokens: int = 600
    max_rss_growth: float = 0.05
    seed: int = 0


@dataclass
class Tally:
    completed: int = 0
    cancelled: int = 0
    cancelled_endings: Counter = field(default_factory=Counter)  # before_output / mid_stream / finished_first
    errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (seconds in, RSS by process)


async def run_soak(http_url: str, grpc_address: str, spec: SoakSpec, vocab_size: int, headers: dict | None = None):
    """The tally of every request, with the RSS of every service process sampled all along."""
    tally = Tally()
    rng = random.Random(spec.seed)
    prefixes = [[rng.randrange(2, vocab_size) for _ in range(256)] for _ in range(SHARED_PREFIXES)]
    deadline = time.monotonic() + spec.duration_s
    metadata = tuple((k.lower(), v) for k, v in (headers or {}).items()) or None
    channel = grpc.aio.insecure_channel(grpc_address)
    stub = pb_grpc.GenerationStub(channel)
    begun = time.monotonic()

    async def sample() -> None:
        while time.monotonic() < deadline:
            rss = await asyncio.to_thread(service_rss)
            tally.rss.append((round(time.monotonic() - begun, 1), rss))
            await asyncio.sleep(min(10.0, spec.duration_s / 20))

    async def client(number: int) -> None:
        draw = random.Random(spec.seed * 1000 + number)
        while time.monotonic() < deadline:
            suffix = [draw.randrange(2, vocab_size) for _ in range(draw.randint(8, spec.max_prompt_tokens // 2))]
            ids = (draw.choice(prefixes) + suffix) if draw.random() < 0.5 else suffix * 2
            ids = ids[: spec.max_prompt_tokens]
            cancel_after = draw.uniform(0.0, 1.0) if draw.random() < spec.cancel_share else None
            sampling = {"max_tokens": draw.randint(1, spec.max_tokens), "temperature": draw.choice((0.0, 0.8))}
            kind = draw.choice(("grpc", "sse", "whole"))
            try:
                if kind == "grpc":
                    ending = await _over_grpc(stub, ids, sampling, cancel_after, metadata)
                else:
                    ending = await _over_http(http, ids, sampling, kind == "sse", cancel_after)
            except Exception as exc:
                tally.errors.append(f"{kind}: {exc!r}"[:300])
                continue
            if cancel_after is None:
                tally.completed += 1
            else:
                tally.cancelled += 1
                tally.cancelled_endings[ending] += 1

    async with httpx.AsyncClient(base_url=http_url, timeout=120, headers=headers or {}) as http:
        sampling = asyncio.create_task(sample())
        await asyncio.gather(*(client(n) for n in range(spec.clients)))
        await sampling
    await channel.close()
    return tally


async def _over_grpc(stub, ids: list[int], sampling: dict, cancel_after: float | None, metadata) -> str:
    """The request read to its end, or to ``cancel_after`` seconds and cancelled there: how it ended."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(**sampling))
    call = stub.Generate(request, timeout=120, metadata=metadata)
    replies = 0
    try:
        async with asyncio.timeout(cancel_after):
            async for reply in call:
                replies += 1
                if reply.finish_reason:
                    return "finished_first"
    except TimeoutError:
        call.cancel()
        return "mid_stream" if replies else "before_output"
    raise RuntimeError("the stream ended without a finish reason")


async def _over_http(http: httpx.AsyncClient, ids: list[int], sampling: dict, stream: bool, cancel_after) -> str:
    """As ``_over_grpc``; a cancelled request's client goes away (the connection closes) at its cancel point."""
    body = {"prompt": ids, "stream": stream, **sampling}
    events = 0
    try:
        async with asyncio.timeout(cancel_after):
            if not stream:
                reply = await http.post("/v1/completions", json=body)
                if reply.status_code != 200 or not reply.json()["choices"][0]["finish_reason"]:
                    raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:200]}")
                return "finished_first"
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code != 200:
                    raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
                finished, last = False, ""
                async for line in reply.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    last, events = line, events + 1
                    if line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:  # a stream that fails mid-way sends its error, then [DONE]
                            raise RuntimeError(f"the stream failed: {line[:200]!r}")
                        finished = finished or any(c.get("finish_reason") for c in event.get("choices", []))
                if not finished or last != "data: [DONE]":
                    raise RuntimeError(f"the stream ended without a finish reason, with {last[:200]!r}")
                return "finished_first"
    except TimeoutError:
        return "mid_stream" if events else "before_output"


def service_rss() -> dict[str, int]:
    """Resident bytes of every Serve process of the running app, by actor name (this machine's processes)."""
    import ray

    rss = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(SERVE_ACTORS):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pid = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
            rss[actor["name"]] = _rss_bytes(pid)
    return rss


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def rss_growth(spec: SoakSpec, samples: list[tuple[float, dict[str, int]]]) -> dict[str, float]:
    """Each process's RSS growth after warm-up: the median of the last quarter of the samples over the
    median of the first quarter. Medians, because allocators hand memory back in steps (a sawtooth),
    and two single samples would measure its phase rather than a trend."""
    after = [rss for seconds, rss in samples if seconds >= spec.warmup_s]
    quarter = max(1, len(after) // 4)
    first, last = after[:quarter], after[-quarter:]
    return {
        name: statistics.median(r[name] for r in last) / statistics.median(r[name] for r in first) - 1
        for name in first[0]
        if all(name in r for r in first + last)
    }


def verdict(spec: SoakSpec, tally: Tally, idle_s: float | None) -> dict:
    """The soak's figures and whether it passed."""
    growth = rss_growth(spec, tally.rss)
    worst = max(growth.values(), default=0.0)
    warm = next(rss for seconds, rss in tally.rss if seconds >= spec.warmup_s)
    return {
        "spec": asdict(spec),
        "completed": tally.completed,
        "cancelled": tally.cancelled,
        "cancelled_endings": dict(tally.cancelled_endings),
        "errors": len(tally.errors),
        "first_errors": tally.errors[:5],
        "rss_mib_after_warmup": {n: round(v / 2**20, 1) for n, v in warm.items()},
        "rss_growth": {n: round(g, 4) for n, g in growth.items()},
        "max_rss_growth": round(worst, 4),
        "rss_mib_over_time": [(t, {n: round(v / 2**20, 1) for n, v in rss.items()}) for t, rss in tally.rss],
        "kv_back_to_baseline_s": idle_s,
        "passed": not tally.errors and worst < spec.max_rss_growth and idle_s is not None,
    }


def wait_idle(grpc_address: str, timeout_s: float, metadata=None) -> float | None:
    """Seconds until every pool reports no running request and no KV block in use; None if it never did."""
    with grpc.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            status = stub.Status(pb.StatusRequest(), timeout=10, metadata=metadata)
            busy = [w for w in status.workers if w.running_seqs or w.waiting_seqs or w.kv_used_fraction > 0]
            if not busy and status.requests_running == 0:
                return time.monotonic() - start
            time.sleep(0.1)
    return None


def soak(service, spec: SoakSpec, vocab_size: int, api_key: str | None = None) -> dict:
    """Run the soak against a running service (this process is its Ray driver) and judge it."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    tally = asyncio.run(run_soak(service.http_url, service.grpc_address, spec, vocab_size, headers))
    metadata = (("authorization", headers["Authorization"]),) if headers else None
    return verdict(spec, tally, wait_idle(service.grpc_address, 10.0, metadata))


def write(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "soak.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
