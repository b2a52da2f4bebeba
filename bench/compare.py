"""``pdserve bench compare``: one workload against several configurations, one report.

Each variant is a set of config overrides; the service is started for it,
loaded, and stopped, all in this invocation, on the same arrivals (same
seed). The report (Markdown, JSON with every request's record, PNG CDFs)
gives each variant's figures and their ratios to the first variant.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import plots
from bench.load import SLO, LoadSpec, records_json, summarize
from bench.running import load_service
from bench.workloads import WorkloadSpec, make_workload
from pdserve.config import PdserveConfig

# Placement only matters with several replicas: four co-located ones sharing one core, each with KV for a few
# of the shared prefixes (so a policy that scatters a prefix over them evicts it).
PLACEMENT_SETUP = {"service.mode": "colocated", "service.decode.num_replicas": 4, "service.decode.cpu_cores": "0",
                   "engine.num_kv_blocks": 40, "engine.block_size": 128, "engine.max_model_len": 2048}  # fmt: skip

VARIANT_SETS: dict[str, dict[str, dict]] = {
    # The same cores either way: co-located, one engine on all of them; disaggregated, half each.
    "modes": {"colocated": {"service.mode": "colocated"}, "disaggregated": {"service.mode": "disaggregated"}},
    "policies": {
        policy: {**PLACEMENT_SETUP, "router.placement.policy": policy}
        for policy in ("round_robin", "least_loaded", "prefix_aware")
    },
}


def run_compare(
    config: PdserveConfig,
    variants: dict[str, dict],
    workload: WorkloadSpec,
    load: LoadSpec,
    slo: SLO | None,
    out_dir: Path,
) -> dict:
    from pdserve.app import model_info

    requests = make_workload(workload, model_info(config.engine).vocab_size)
    runs = {}
    for name, overrides in variants.items():
        records, wall = load_service(config, overrides, requests, load)
        runs[name] = {"overrides": overrides, "summary": summarize(records, wall, slo), "records": records}
    report = {
        "workload": workload.__dict__,
        "load": load.__dict__,
        "variants": {name: {"overrides": r["overrides"], "summary": r["summary"]} for name, r in runs.items()},
        "ratios_to_first": _ratios(runs),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "records.json").write_text(
        json.dumps({name: records_json(r["records"]) for name, r in runs.items()}) + "\n"
    )
    ok = {name: [x for x in r["records"] if not x.error] for name, r in runs.items()}
    plots.cdf({n: [x.ttft_s for x in rs] for n, rs in ok.items()}, f"TTFT, {workload.name}", "TTFT (ms)",
              out_dir / "ttft_cdf.png")  # fmt: skip
    plots.cdf({n: [g for x in rs for g in x.itl_s] for n, rs in ok.items()}, f"inter-token latency, {workload.name}",
              "ITL (ms)", out_dir / "itl_cdf.png")  # fmt: skip
    (out_dir / "report.md").write_text(markdown(report, ["ttft_cdf.png", "itl_cdf.png"]))
    return report


def _ratios(runs: dict) -> dict:
    """Each variant's figures over the first variant's (latencies: first / this, so > 1 means this is faster).

    None where the first variant's figure is zero (no ratio to speak of)."""
    names = list(runs)
    base = runs[names[0]]["summary"]
    ratios = {}
    for name in names[1:]:
        summary = runs[name]["summary"]
        ratios[name] = {
            "ttft_p50_speedup": _ratio(base["ttft"]["p50_ms"], summary["ttft"]["p50_ms"]),
            "itl_p99_ratio": _ratio(summary["itl"]["p99_ms"], base["itl"]["p99_ms"]),
            "throughput_ratio": _ratio(summary["output_tokens_per_s"], base["output_tokens_per_s"]),
            "hit_rate_ratio": _ratio(summary["prefix_hit_rate"], base["prefix_hit_rate"]),
        }
        if "goodput_rps" in base:
            ratios[name]["goodput_ratio"] = _ratio(summary["goodput_rps"], base["goodput_rps"])
    return ratios


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def markdown(report: dict, images: list[str]) -> str:
    lines = [f"# {report['workload']['name']}: " + " vs ".join(report["variants"]), ""]
    lines += ["| variant | TTFT p50/p90/p99 ms | TPOT p50 ms | ITL p50/p99 ms | e2e p50 ms | out tok/s | hit rate |"
              + (" goodput req/s |" if _has_goodput(report) else ""),
              "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if _has_goodput(report) else "")]  # fmt: skip
    for name, variant in report["variants"].items():
        s = variant["summary"]
        t, i = s["ttft"], s["itl"]
        row = (f"| {name} | {t['p50_ms']:.0f}/{t['p90_ms']:.0f}/{t['p99_ms']:.0f} | {s['tpot']['p50_ms']:.1f} | "
               f"{i['p50_ms']:.1f}/{i['p99_ms']:.1f} | {s['e2e']['p50_ms']:.0f} | {s['output_tokens_per_s']:.0f} | "
               f"{s['prefix_hit_rate']:.2f} |")  # fmt: skip
        if _has_goodput(report):
            row += f" {s['goodput_rps']:.2f} |"
        lines.append(row)
    lines += ["", "Ratios to the first variant:", "", "```json", json.dumps(report["ratios_to_first"], indent=2), "```"]
    lines += [""] + [f"![{image}]({image})" for image in images]
    return "\n".join(lines) + "\n"


def _has_goodput(report: dict) -> bool:
    return all("goodput_rps" in v["summary"] for v in report["variants"].values())
