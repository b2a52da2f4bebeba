"""The load generator: a workload's sessions sent to a running pdserve over OpenAI HTTP (SSE) or gRPC.

Open loop: sessions start at Poisson arrival times (``rate`` per second),
whatever the service's state, as real clients do. Closed loop: ``users``
clients, each running one session after another. Turns of a session run in
order. Every request becomes one ``Record`` (per-request figures, its error
if it failed); ``summarize`` turns records into percentiles, throughput and
goodput: requests per second that met the TTFT SLO and the TPOT SLO together
(DistServe's definition).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import grpc
import httpx
from tqdm import tqdm

from bench.workloads import Turn, Workload
from pdserve_pb.v1 import generate_pb2 as pb
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc


@dataclass
class Record:
    session: int
    turn: int
    start_s: float  # since the run began
    prompt_tokens: int
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""
    prompt_worker: str = ""  # gRPC only: the worker that computed the prompt (a decode worker when it did)
    decode_worker: str = ""  # gRPC only
    router: str = ""  # gRPC only: the router replica that ran it
    ttft_parts_s: dict[str, float] = field(default_factory=dict)  # gRPC only: the router's split of its TTFT

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@dataclass(frozen=True)
class LoadSpec:
    api: Literal["http", "grpc"] = "http"
    rate: float | None = None  # sessions per second (open loop)
    users: int | None = None  # closed loop
    seed: int = 0
    timeout_s: float = 300.0
    progress: bool = True

    def __post_init__(self):
        if (self.rate is None) == (self.users is None):
            raise ValueError("give either a rate (open loop) or a number of users (closed loop)")


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float

    def met(self, record: Record) -> bool:
        return not record.error and record.ttft_s * 1000 <= self.ttft_ms and record.tpot_s * 1000 <= self.tpot_ms


async def run_load(http_url: str, grpc_address: str, workload: Workload, spec: LoadSpec) -> tuple[list[Record], float]:
    """Every session of ``workload`` against the service; returns the records and the wall time."""
    records: list[Record] = []
    bar = tqdm(total=workload.requests, desc=workload.name, unit="req", disable=not spec.progress, file=sys.stderr)
    channel = grpc.aio.insecure_channel(grpc_address) if spec.api == "grpc" else None
    stub = pb_grpc.GenerationStub(channel) if channel is not None else None
    async with httpx.AsyncClient(base_url=http_url, timeout=spec.timeout_s) as client:
        begun = time.perf_counter()

        async def session(number: int) -> None:
            for turn_no, turn in enumerate(workload.sessions[number]):
                record = Record(number, turn_no, time.perf_counter() - begun, len(turn.prompt))
                records.append(record)
                try:
                    if stub is None:
                        await _over_http(client, turn, record)
                    else:
                        await send_grpc(stub, turn, record, spec.timeout_s)
                except Exception as exc:  # recorded, and the rest of the session is not sent
                    record.error = repr(exc)[:500]
                bar.update(1)
                if record.error:
                    bar.update(len(workload.sessions[number]) - turn_no - 1)
                    return

        try:
            if spec.users is not None:
                queue = iter(range(len(workload.sessions)))

                async def user() -> None:
                    for number in queue:
                        await session(number)

                await asyncio.gather(*(user() for _ in range(spec.users)))
            else:
                rng = random.Random(spec.seed)
                tasks = []
                for number in range(len(workload.sessions)):
                    tasks.append(asyncio.create_task(session(number)))
                    await asyncio.sleep(rng.expovariate(spec.rate))
                await asyncio.gather(*tasks)
        finally:
            if channel is not None:
                await channel.close()
        wall = time.perf_counter() - begun
    bar.close()
    return sorted(records, key=lambda r: (r.start_s, r.session)), wall


async def _over_http(client: httpx.AsyncClient, turn: Turn, record: Record) -> None:
    body = {"prompt": turn.prompt, "max_tokens": turn.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = last = time.perf_counter()
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                last = _token(record, start, last, 1)  # an SSE chunk carries text, not a token count
    record.e2e_s = time.perf_counter() - start
    if usage is not None:  # the exact counts
        record.output_tokens = usage["completion_tokens"]
        record.cached_tokens = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)


async def send_grpc(stub, turn: Turn, record: Record, timeout_s: float) -> None:
    sampling = pb.SamplingParams(max_tokens=turn.max_tokens, temperature=0, ignore_eos=True)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=turn.prompt), sampling=sampling)
    start = last = time.perf_counter()
    async for reply in stub.Generate(request, timeout=timeout_s):
        if reply.HasField("usage"):
            record.cached_tokens = reply.usage.cached_prompt_tokens
        if reply.HasField("timing"):
            record.decode_worker = reply.timing.decode_worker
            record.prompt_worker = reply.timing.prefill_worker or reply.timing.decode_worker
            record.router = reply.timing.router
            record.ttft_parts_s = dict(reply.timing.ttft_parts_s)
        if reply.token_ids:
            last = _token(record, start, last, len(reply.token_ids))
    record.e2e_s = time.perf_counter() - start


async def send_at(stub, begun: float, at: float, number: int, turn: Turn, records: list[Record]) -> None:
    """Request ``number`` of an open-loop trace, sent over gRPC ``at`` seconds after ``begun``; its record (an
    error included) joins ``records``."""
    await asyncio.sleep(max(0.0, at - (time.perf_counter() - begun)))
    record = Record(number, 0, time.perf_counter() - begun, len(turn.prompt))
    records.append(record)
    try:
        await send_grpc(stub, turn, record, 300.0)
    except Exception as exc:
        record.error = repr(exc)[:300]


def _token(record: Record, start: float, last: float, count: int) -> float:
    now = time.perf_counter()
    if record.output_tokens == 0:
        record.ttft_s = now - start
    else:
        record.itl_s.extend([(now - last) / count] * count)
    record.output_tokens += count
    return now


def summarize(records: list[Record], wall_s: float, slo: SLO | None = None) -> dict:
    done = [r for r in records if not r.error]
    summary = {
        "requests": len(records),
        "errors": len(records) - len(done),
        "ttft": percentiles([r.ttft_s for r in done]),
        "tpot": percentiles([r.tpot_s for r in done if r.output_tokens > 1]),
        "itl": percentiles([gap for r in done for gap in r.itl_s]),
        "e2e": percentiles([r.e2e_s for r in done]),
        "requests_per_s": len(done) / wall_s,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / wall_s,
        "prefix_hit_rate": sum(r.cached_tokens for r in done) / max(sum(r.prompt_tokens for r in done), 1),
        "wall_s": wall_s,
    }
    if parts := ttft_parts_mean_ms(done):  # where the router's TTFT goes, as means (they add up to its mean)
        summary["ttft_parts_mean_ms"] = parts
    if slo is not None:
        met = sum(slo.met(r) for r in records)
        summary.update(slo=asdict(slo), slo_attainment=met / max(len(records), 1), goodput_rps=met / wall_s)
    return summary


def ttft_parts_mean_ms(records: list[Record]) -> dict[str, float]:
    """The router's split of these requests' TTFT, each part's mean in ms (gRPC only: none without it)."""
    split = [r.ttft_parts_s for r in records if r.ttft_parts_s]
    parts = sorted({part for one in split for part in one})
    return {part: 1000 * statistics.fmean(one.get(part, 0.0) for one in split) for part in parts}


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values) or [0.0]

    def pick(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99), "mean_ms": 1000 * statistics.fmean(ordered)}


def records_json(records: list[Record]) -> list[dict]:
    return [{**asdict(r), "tpot_s": r.tpot_s} for r in records]
