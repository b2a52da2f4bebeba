"""``pdserve bench questions``: the three measured answers users choose a serving system by.

1. Inter-token latency under prefill interference: decode streams (short
   prompts, long outputs, 4 closed-loop users) while long prompts arrive
   (Poisson); p99 ITL of the decode streams, disaggregated over co-located on
   the same cores (co-located: one engine on all of them; disaggregated: half
   each). Key ``itl_p99_disagg_vs_colocated`` (target ≤ 0.5).
2. Goodput: long prompts and long outputs at a sweep of Poisson rates; the
   TTFT and TPOT SLOs are set from co-located at the lowest rate (1.25 × its
   p90s, so it just meets them there); goodput = requests/s meeting both. Key
   ``goodput_disagg_vs_colocated``: the best goodput over the sweep,
   disaggregated over co-located (target ≥ 1.3).
3. Placement: the ``shared-prefix`` workload on four co-located replicas
   (``compare.PLACEMENT_SETUP``), ``round_robin`` vs ``prefix_aware``, cold
   starts on the same arrivals, repeated; key
   ``ttft_p50_round_robin_vs_prefix_aware``: the median over rounds of
   round_robin's p50 TTFT over prefix_aware's (target ≥ 3), with hit rates.

Everything runs in this invocation; results go to ``questions.json``,
``questions.md`` and PNGs in the output folder.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from dataclasses import replace
from pathlib import Path

from bench import plots
from bench.compare import PLACEMENT_SETUP
from bench.load import SLO, LoadSpec, Record, run_load, summarize
from bench.running import load_service, with_service
from bench.workloads import WorkloadSpec, make_workload
from pdserve.config import PdserveConfig

MODES = ("colocated", "disaggregated")
GOODPUT_RATES = (0.25, 0.5, 1.0, 1.5)


def run_questions(config: PdserveConfig, out_dir: Path, placement_rounds: int = 3) -> dict:
    from pdserve.app import model_info

    vocab = model_info(config.engine).vocab_size
    out_dir.mkdir(parents=True, exist_ok=True)
    answers: dict = {}
    answers.update(_interference(config, vocab, out_dir))
    answers.update(_goodput(config, vocab, out_dir))
    answers.update(_placement(config, vocab, out_dir, placement_rounds))
    (out_dir / "questions.json").write_text(json.dumps(answers, indent=2) + "\n")
    (out_dir / "questions.md").write_text(_markdown(answers))
    return answers


def _interference(config: PdserveConfig, vocab: int, out_dir: Path) -> dict:
    decoders = make_workload(WorkloadSpec("random", 16, input_tokens=64, output_tokens=192, spread=0.0, seed=1), vocab)
    prompts = make_workload(WorkloadSpec("random", 12, input_tokens=1536, output_tokens=2, spread=0.0, seed=2), vocab)

    async def both(service) -> list[Record]:
        streams, _ = await asyncio.gather(
            run_load(service.http_url, service.grpc_address, decoders, LoadSpec(users=4)),
            run_load(service.http_url, service.grpc_address, prompts, LoadSpec(rate=1.0, seed=3, progress=False)),
        )
        return streams[0]

    records = {mode: with_service(config, {"service.mode": mode}, lambda s: asyncio.run(both(s))) for mode in MODES}
    itl = {mode: summarize(rs, 1.0)["itl"] for mode, rs in records.items()}
    itl_gaps = {m: [g for r in rs for g in r.itl_s] for m, rs in records.items()}
    plots.cdf(itl_gaps, "ITL of decode streams while long prompts arrive", "ITL (ms)", out_dir / "itl_interference.png")
    return {
        "itl_p99_disagg_vs_colocated": itl["disaggregated"]["p99_ms"] / itl["colocated"]["p99_ms"],
        "interference": {"itl": itl, "errors": {m: sum(bool(r.error) for r in rs) for m, rs in records.items()}},
    }


def _goodput(config: PdserveConfig, vocab: int, out_dir: Path) -> dict:
    spec = WorkloadSpec("random", input_tokens=1024, output_tokens=128, spread=0.25)
    runs: dict[str, list[tuple[list[Record], float]]] = {}
    for mode in MODES:

        def sweep(service) -> list[tuple[list[Record], float]]:
            out = []
            for number, rate in enumerate(GOODPUT_RATES):
                requests = make_workload(replace(spec, requests=max(12, int(20 * rate)), seed=10 + number), vocab)
                load = LoadSpec(rate=rate, seed=number)
                out.append(asyncio.run(run_load(service.http_url, service.grpc_address, requests, load)))
            return out

        runs[mode] = with_service(config, {"service.mode": mode}, sweep)
    lowest = summarize(*runs["colocated"][0])
    slo = SLO(ttft_ms=1.25 * lowest["ttft"]["p90_ms"], tpot_ms=1.25 * lowest["tpot"]["p90_ms"])
    summaries = {mode: [summarize(records, wall, slo) for records, wall in runs[mode]] for mode in MODES}
    goodput = {mode: [s["goodput_rps"] for s in summaries[mode]] for mode in MODES}
    plots.goodput(list(GOODPUT_RATES), goodput, f"goodput at TTFT ≤ {slo.ttft_ms:.0f} ms, TPOT ≤ {slo.tpot_ms:.0f} ms",
                  out_dir / "goodput_vs_rate.png")  # fmt: skip
    return {
        "goodput_disagg_vs_colocated": max(goodput["disaggregated"]) / max(max(goodput["colocated"]), 1e-9),
        "goodput": {
            "rates": list(GOODPUT_RATES),
            "slo": slo.__dict__,
            "goodput_rps": goodput,
            "summaries": summaries,
        },  # fmt: skip
    }


def _placement(config: PdserveConfig, vocab: int, out_dir: Path, rounds: int) -> dict:
    spec = WorkloadSpec("shared-prefix", 96, input_tokens=64, output_tokens=32, system_prompts=16,
                        system_prompt_tokens=1024, zipf_s=0.0)  # fmt: skip
    requests = make_workload(spec, vocab)
    policies = ("prefix_aware", "round_robin")
    runs: dict[str, list[dict]] = {policy: [] for policy in policies}
    ttfts: dict[str, list[float]] = {}
    for round_no in range(rounds):  # each round: both policies from a cold start, on the same arrivals
        for policy in policies:
            load = LoadSpec(rate=2.0, seed=round_no)
            overrides = {**PLACEMENT_SETUP, "router.placement.policy": policy}
            records, wall = load_service(config, overrides, requests, load)
            runs[policy].append(summarize(records, wall))
            if round_no == 0:
                ttfts[policy] = [r.ttft_s for r in records if not r.error]
    ratios = [rr["ttft"]["p50_ms"] / aware["ttft"]["p50_ms"] for aware, rr in zip(*runs.values(), strict=True)]
    plots.cdf(ttfts, "TTFT, shared-prefix, 4 replicas (first round)", "TTFT (ms)", out_dir / "ttft_placement.png")
    return {
        "ttft_p50_round_robin_vs_prefix_aware": statistics.median(ratios),
        "placement": {
            "rounds": ratios,
            "hit_rate": {p: [s["prefix_hit_rate"] for s in runs[p]] for p in policies},
            "summaries": runs,
        },  # fmt: skip
    }


def _markdown(answers: dict) -> str:
    interference, goodput, placement = answers["interference"], answers["goodput"], answers["placement"]
    itl = interference["itl"]
    lines = [
        "# The three questions, measured on this machine",
        "",
        "| question | answer | target |",
        "| --- | --- | --- |",
        f"| p99 ITL under prefill interference, disaggregated / co-located | "
        f"{answers['itl_p99_disagg_vs_colocated']:.2f} | ≤ 0.5 |",
        f"| best goodput, disaggregated / co-located | {answers['goodput_disagg_vs_colocated']:.2f} | ≥ 1.3 |",
        f"| p50 TTFT on shared-prefix, round_robin / prefix_aware | "
        f"{answers['ttft_p50_round_robin_vs_prefix_aware']:.2f} | ≥ 3 |",
        "",
        "## 1. Inter-token latency under prefill interference",
        "",
        "| mode | ITL p50 ms | ITL p90 ms | ITL p99 ms |",
        "| --- | --- | --- | --- |",
        *(f"| {m} | {itl[m]['p50_ms']:.1f} | {itl[m]['p90_ms']:.1f} | {itl[m]['p99_ms']:.1f} |" for m in MODES),
        "",
        "![ITL](itl_interference.png)",
        "",
        "## 2. Goodput",
        "",
        f"SLO: TTFT ≤ {goodput['slo']['ttft_ms']:.0f} ms and TPOT ≤ {goodput['slo']['tpot_ms']:.1f} ms.",
        "",
        "| offered req/s | " + " | ".join(f"{m} goodput" for m in MODES) + " |",
        "| --- | --- | --- |",
        *(
            f"| {rate} | " + " | ".join(f"{goodput['goodput_rps'][m][i]:.2f}" for m in MODES) + " |"
            for i, rate in enumerate(goodput["rates"])
        ),
        "",
        "![goodput](goodput_vs_rate.png)",
        "",
        "## 3. Placement",
        "",
        "round_robin / prefix_aware p50 TTFT per round: " + ", ".join(f"{r:.2f}" for r in placement["rounds"]),
        "",
        "hit rates per round: "
        + "; ".join(f"{p} " + ", ".join(f"{h:.2f}" for h in hs) for p, hs in placement["hit_rate"].items()),
        "",
        "![TTFT](ttft_placement.png)",
    ]
    return "\n".join(lines) + "\n"
