"""The rank worker's niceness, A/B on one server: what engine/process_priority.py rests on.

``python -m bench.niceness_ab --model DIR [--workload random|prefix] [--seeds 3]``
starts ``pdserve up --mode colocated`` on DIR (the bench model: ``pdserve
make-model DIR --preset bench``; pdserve's defaults otherwise: the rank
worker at nice 0 where the OS allows), then for each seed runs vLLM's ``bench
serve`` (the same client and workloads as ``pdserve bench vllm``) twice: once
with every thread of vLLM's rank worker set back to Ray's 15, once at 0. One
server for both sides, so the run-to-run spread of starting servers stays out
of the comparison. Prints medians and the ratio 0 / 15. Raising a niceness
needs no privilege; setting it back to 0 needs CAP_SYS_NICE.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import psutil

from bench.vllm_compare import WORKLOADS, Server, _client, pdserve_up
from engine.process_priority import can_lower_niceness, prioritize

_KEYS = ("output_throughput", "median_itl_ms", "median_tpot_ms", "median_ttft_ms")


def rank_workers(server_pid: int) -> set[int]:
    """vLLM's rank worker processes below ``pdserve up`` (process titles vLLM 0.32 sets)."""
    workers = set()
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith("VLLM::Worker"):
                workers.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return workers


def run(model_dir: Path, workload: str, seeds: int, port: int = 8000) -> dict:
    flags = WORKLOADS[workload]
    runs: dict[int, list[dict]] = {15: [], 0: []}
    server = Server(pdserve_up(model_dir, port, "colocated"), {}, f"http://127.0.0.1:{port}", {"decode": 1})
    with server as url:
        workers = rank_workers(server.pid)
        if not workers:
            raise RuntimeError("no vLLM rank worker found below pdserve up")
        for seed in range(seeds):
            for nice in (15, 0):
                prioritize(workers, nice)
                fresh = 100 + 2 * seed + (nice == 0)  # prompts of their own: nothing cached by an earlier run
                runs[nice].append(_client(url, model_dir.name, model_dir, [*flags, "--seed", str(fresh)]))
    medians = {nice: {k: statistics.median(r[k] for r in figures) for k in _KEYS} for nice, figures in runs.items()}
    return {
        "workload": workload,
        "seeds": seeds,
        "nice_15": medians[15],
        "nice_0": medians[0],
        **{f"{key}_0_vs_15": round(medians[0][key] / medians[15][key], 3) for key in _KEYS if medians[15][key]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.niceness_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="random")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", type=Path, required=True, help="e.g. made by: pdserve make-model DIR --preset bench")
    args = parser.parse_args(argv)
    if not can_lower_niceness():
        sys.exit("setting the worker back to nice 0 needs CAP_SYS_NICE")
    print(json.dumps(run(args.model, args.workload, args.seeds), indent=2))


if __name__ == "__main__":
    main()
