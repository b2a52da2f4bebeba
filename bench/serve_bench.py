"""Service benchmarks built on the load generator.

- ``run_serve``: one workload against a running pdserve (or one started
  here), open or closed loop, over HTTP or gRPC: the figures, every
  request's record, and TTFT / ITL CDFs.
- ``run_overhead``: TTFT of 1k-token prompts through the whole service (HTTP,
  router, prefill worker, KV transfer, decode worker) over TTFT of the same
  engine called in-process, both on one core, in this invocation.
- ``run_router_replicas``: prefix-hit rate through two router replicas over
  one Redis index against one router.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx

from bench import plots
from bench.compare import PLACEMENT_SETUP
from bench.load import SLO, LoadSpec, Record, records_json, run_load, summarize
from bench.report import Row, report
from bench.running import load_service, with_service
from bench.workloads import Turn, Workload, WorkloadSpec, make_workload
from pdserve.config import PdserveConfig

OVERHEAD_PROMPT = 1024


def run_serve(
    config: PdserveConfig,
    workload: WorkloadSpec,
    loads: list[LoadSpec],
    slo: SLO | None,
    out_dir: Path | None,
    http_url: str | None = None,
    grpc_address: str | None = None,
) -> dict:
    """``workload`` under each load in turn (a sweep of rates when several), against the service at
    ``http_url``/``grpc_address`` or one started from ``config``."""
    from pdserve.app import model_info

    vocab = _served_vocab_size(http_url) if http_url is not None else model_info(config.engine).vocab_size
    requests = make_workload(workload, vocab)

    def sweep(http: str, grpc: str) -> list[tuple[list[Record], float]]:
        return [asyncio.run(run_load(http, grpc, requests, load)) for load in loads]

    if http_url is not None:
        runs = sweep(http_url, grpc_address or "")
    else:
        runs = with_service(config, {}, lambda service: sweep(service.http_url, service.grpc_address))
    results = {"workload": workload.__dict__, "runs": []}
    for load, (records, wall) in zip(loads, runs, strict=True):
        summary = summarize(records, wall, slo)
        results["runs"].append({"load": load.__dict__, "summary": summary})
        print(f"\n{workload.name}, " + (f"rate {load.rate}/s" if load.rate is not None else f"{load.users} users"))
        report(_rows(summary), results, None)
    if out_dir is not None:
        _write(out_dir, workload.name, loads, runs, results, slo)
    return results


def _write(out_dir: Path, name: str, loads: list[LoadSpec], runs, results: dict, slo: SLO | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    label = [f"rate {load.rate}" if load.rate is not None else f"{load.users} users" for load in loads]
    (out_dir / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    records = {key: records_json(records) for key, (records, _) in zip(label, runs, strict=True)}
    (out_dir / "records.json").write_text(json.dumps(records) + "\n")
    done = {key: [r for r in records if not r.error] for key, (records, _) in zip(label, runs, strict=True)}
    plots.cdf({k: [r.ttft_s for r in rs] for k, rs in done.items()}, f"TTFT, {name}", "TTFT (ms)",
              out_dir / "ttft_cdf.png")  # fmt: skip
    plots.cdf({k: [g for r in rs for g in r.itl_s] for k, rs in done.items()}, f"ITL, {name}", "ITL (ms)",
              out_dir / "itl_cdf.png")  # fmt: skip
    written = ["summary.json", "records.json", "ttft_cdf.png", "itl_cdf.png"]
    rates = [load.rate for load in loads]
    if slo is not None and len(loads) > 1 and None not in rates:
        goodput = [run["summary"]["goodput_rps"] for run in results["runs"]]
        plots.goodput(rates, {name: goodput}, f"goodput, {name}", out_dir / "goodput_vs_rate.png")
        written.append("goodput_vs_rate.png")
    print(f"wrote {', '.join(written)} in {out_dir}")


def _served_vocab_size(http_url: str) -> int:
    """Prompts are token ids: they must be below the served model's vocabulary size (``/v1/models``)."""
    card = httpx.get(http_url.rstrip("/") + "/v1/models", timeout=30).raise_for_status().json()["data"][0]
    return card["vocab_size"]


def _rows(summary: dict) -> list[Row]:
    rows: list[Row] = [("requests (errors)", f"{summary['requests']} ({summary['errors']})", "")]
    for metric in ("ttft", "tpot", "itl", "e2e"):
        p = summary[metric]
        rows.append((f"{metric} p50/p90/p99 ms", f"{p['p50_ms']:.0f}/{p['p90_ms']:.0f}/{p['p99_ms']:.0f}", ""))
    rows += [
        ("requests/s", f"{summary['requests_per_s']:.2f}", ""),
        ("output tokens/s", f"{summary['output_tokens_per_s']:.0f}", ""),
        ("prefix-hit rate", f"{summary['prefix_hit_rate']:.2f}", ""),
    ]
    if "goodput_rps" in summary:
        rows += [("goodput req/s", f"{summary['goodput_rps']:.2f}", ""),
                 ("SLO attainment", f"{summary['slo_attainment']:.2f}", "")]  # fmt: skip
    return rows


def run_overhead(config: PdserveConfig, json_path: Path | None) -> dict:
    from pdserve.app import model_info

    rng = random.Random(0)
    vocab = model_info(config.engine).vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(OVERHEAD_PROMPT)] for _ in range(8)]
    engine_ttft = _in_process_ttft(config, prompts)
    one_by_one = Workload("1k prompts", [[Turn(p[::-1], 2)] for p in prompts])
    records, _ = with_service(config, {"service.mode": "disaggregated"}, lambda service: asyncio.run(
        run_load(service.http_url, service.grpc_address, one_by_one, LoadSpec(users=1, rate=None))))  # fmt: skip
    service_ttft = statistics.median(r.ttft_s for r in records)
    results = {
        "overhead_vs_ttft": service_ttft / engine_ttft - 1,
        "engine_in_process_ttft_1k_ms": 1000 * engine_ttft,
        "service_ttft_1k_ms": 1000 * service_ttft,
        "model": str(config.engine.model),
    }
    report([("router+transfer overhead / TTFT (1k)", f"{results['overhead_vs_ttft']:.3f}", "<= 0.10"),
            ("TTFT 1k, in-process engine (ms)", f"{1000 * engine_ttft:.1f}", ""),
            ("TTFT 1k, through the service (ms)", f"{1000 * service_ttft:.1f}", "")], results, json_path)  # fmt: skip
    return results


def _in_process_ttft(config: PdserveConfig, prompts: list[list[int]]) -> float:
    """One engine in its own process, on one core as each worker is (bound, one thread): time to its one token."""
    from bench.engine_process import EnginePeer

    peer = EnginePeer(config.engine.model_copy(update={"cpu_cores": "0"}), {"OMP_NUM_THREADS": "1"})
    try:
        peer.generate("warmup", prompts[0], 1)
        times = []
        for i, ids in enumerate(prompts):
            start = time.perf_counter()
            peer.generate(f"ttft-{i}", ids[::-1], 1)
            times.append(time.perf_counter() - start)
    finally:
        peer.stop()
    return statistics.median(times)


def run_router_replicas(config: PdserveConfig, routers: int, requests: int, rate: float, repeats: int) -> dict:
    """Prefix-hit rate of ``shared-prefix`` through ``routers`` router replicas over one Redis index, vs one router.

    The placement setup of ``bench compare`` (co-located replicas on one core,
    KV for a few of the prefixes each), ``prefix_aware``, Redis for both runs;
    each round runs both from a cold start on the same arrivals. Hit rates are
    the requests' own cached-token counts (``usage``), so no router's metrics are missed.
    """
    from pdserve.app import model_info

    spec = WorkloadSpec("shared-prefix", requests, input_tokens=64, output_tokens=2, system_prompts=16,
                        system_prompt_tokens=1024, zipf_s=0.0)  # fmt: skip
    shared = make_workload(spec, model_info(config.engine).vocab_size)
    runs: dict[int, list[float]] = {1: [], routers: []}
    for round_no in range(repeats):
        for count in runs:
            overrides = {**PLACEMENT_SETUP, "router.index.redis_url": "local", "service.router.num_replicas": count}
            load = LoadSpec(rate=rate, seed=round_no)
            records, wall = load_service(config, overrides, shared, load)
            runs[count].append(summarize(records, wall)["prefix_hit_rate"])
    ratios = [many / one for one, many in zip(runs[1], runs[routers], strict=True)]
    return {
        "service_multi_router_hit_vs_single": statistics.median(ratios),
        "service_multi_router_hit_vs_single_rounds": ratios,
        "service_routers": routers,
        "service_single_router_hit_rates": runs[1],
        "service_multi_router_hit_rates": runs[routers],
    }
