"""The ``pdserve`` command: up, generate, status, make-model, bench."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

from engine.errors import EngineError
from engine.tiny_model import ARCHS, PRESETS, ModelShape
from pdserve.config import ConfigError, PdserveConfig, load_config, parse_assignment
from pdserve.grpc_fork import turn_off_grpc_fork_handlers


def main(argv: list[str] | None = None) -> int:
    turn_off_grpc_fork_handlers()  # before any command imports grpc and starts Ray
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, EngineError) as exc:
        print(f"pdserve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Prefill/decode-disaggregated LLM serving.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    make = commands.add_parser("make-model", help="write a tiny random-weight Hugging Face model directory")
    make.add_argument("dir", type=Path, help="output directory")
    make.add_argument("--preset", choices=tuple(PRESETS), default="tiny", help="starting shape (default: tiny)")
    make.add_argument("--arch", choices=ARCHS)
    make.add_argument("--vocab-size", type=int)
    make.add_argument("--hidden-size", type=int)
    make.add_argument("--layers", type=int)
    make.add_argument("--heads", type=int)
    make.add_argument("--kv-heads", type=int)
    make.add_argument("--seed", type=int)
    make.set_defaults(run=_make_model)

    up = commands.add_parser("up", help="run the service: Ray, the Serve app, HTTP and gRPC, until Ctrl-C")
    _add_config_flags(up)
    up.add_argument("--mode", choices=("disaggregated", "colocated"))
    up.add_argument("--redis", metavar="URL", help="Redis index URL; 'local' starts redis-server (default: in-memory)")
    up.add_argument("--http-port", type=int)
    up.add_argument("--grpc-port", type=int)
    up.add_argument("--num-cpus", type=int, help="logical CPUs of the local Ray cluster (default: max(cores, 4))")
    up.add_argument("--try", dest="try_prompt", metavar="PROMPT", help="once up, answer PROMPT over gRPC and HTTP")
    up.add_argument("--exit", action="store_true", help="stop after --try instead of serving until Ctrl-C")
    up.set_defaults(run=_up)

    serve_config = commands.add_parser(
        "serve-config", help="print this config as a Serve config file, for `serve deploy` / `serve run`"
    )
    _add_config_flags(serve_config)
    serve_config.set_defaults(run=_serve_config)

    generate = commands.add_parser("generate", help="stream a completion from a running pdserve (gRPC)")
    _add_config_flags(generate)
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text; several are answered in turn")
    generate.add_argument("--address", default="127.0.0.1:9000", help="gRPC address of pdserve (default: %(default)s)")
    generate.add_argument("--local", action="store_true", help="run the engine in this process instead")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=-1)
    generate.add_argument("--seed", type=int)
    generate.set_defaults(run=_generate)

    status = commands.add_parser("status", help="pools, replicas, load, index and hit rate of a running pdserve")
    status.add_argument("--address", default="127.0.0.1:9000", help="gRPC address of pdserve (default: %(default)s)")
    status.set_defaults(run=_status)

    bench = commands.add_parser("bench", help="run a benchmark")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    engine_bench = suites.add_parser("engine", help="pdserve's engine interface vs vLLM's offline LLM.generate")
    _add_config_flags(engine_bench)
    engine_bench.add_argument("--requests", type=int, default=32, help="concurrent streamed requests")
    engine_bench.add_argument("--repeats", type=int, default=3, help="rounds per measurement; medians reported")
    engine_bench.add_argument(
        "--json",
        nargs="?",
        const=Path("bench/results/engine.json"),
        type=Path,
        metavar="PATH",
        help="also write the figures as JSON (default path: bench/results/engine.json)",
    )
    engine_bench.set_defaults(run=_bench_engine)
    router_bench = suites.add_parser("router", help="placement decision latency (memory, Redis) and prefix hit rate")
    _add_config_flags(router_bench)
    router_bench.add_argument("--workers", type=int, default=64, help="live workers in the index")
    router_bench.add_argument("--index-blocks", type=int, default=1_000_000, help="blocks held in the index")
    router_bench.add_argument("--decisions", type=int, default=2000, help="timed placement decisions per backend")
    router_bench.add_argument("--routers", type=int, default=8, help="routers sharing the index in the simulation")
    router_bench.add_argument(
        "--service", action="store_true", help="also the real service: hit rate with --routers router replicas vs 1"
    )
    router_bench.add_argument(
        "--engine", choices=("vllm", "simulated"),
        help="with --service: vLLM on the config's model (the default, ~10 min), or 8 + 16 simulated workers",
    )  # fmt: skip
    router_bench.add_argument(
        "--view-delay-ms", type=float, default=50.0, help="how late cache events and heartbeats reach the routers"
    )
    router_bench.add_argument(
        "--json", nargs="?", const=Path("bench/results/router.json"), type=Path, metavar="PATH",
        help="also write the figures as JSON (default path: bench/results/router.json)",
    )  # fmt: skip
    router_bench.set_defaults(run=_bench_router)
    transfer_bench = suites.add_parser(
        "transfer", help="KV channels vs raw Gloo / gRPC / memcpy, and the hand-off cost"
    )
    _add_config_flags(transfer_bench)
    transfer_bench.add_argument("--repeats", type=int, default=5, help="timed rounds; medians reported")
    transfer_bench.add_argument("--block-pulls", type=int, default=50, help="one-block pulls for the latency p50")
    transfer_bench.add_argument("--no-handoff", action="store_true", help="skip the hand-off through two vLLM engines")
    transfer_bench.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cuda: also gRPC between caches on the GPU, in vLLM's GPU layout (needs a CUDA device)",
    )  # fmt: skip
    transfer_bench.add_argument(
        "--json", nargs="?", const=Path("bench/results/transfer.json"), type=Path, metavar="PATH",
        help="also write the figures as JSON (default path: bench/results/transfer.json)",
    )  # fmt: skip
    transfer_bench.set_defaults(run=_bench_transfer)
    plan = commands.add_parser("plan", help="prefill and decode replicas for a target rate, from measured figures")
    plan.add_argument("--rate", type=float, required=True, help="target requests per second")
    plan.add_argument("--input-tokens", type=float, required=True, help="mean prompt length")
    plan.add_argument("--output-tokens", type=float, required=True, help="mean output length")
    plan.add_argument("--prefill-tokens-per-s", type=float, required=True, help="one prefill replica's prompt tokens/s")
    plan.add_argument("--decode-tokens-per-s", type=float, required=True, help="one decode replica's tokens/s, batched")
    plan.add_argument("--decode-step-ms", type=float, required=True, help="one decode step with a batch of one")
    plan.add_argument("--kv-bytes-per-token", type=int, required=True, help="e.g. 131072 for Llama-3-8B in fp16")
    plan.add_argument("--link-gb-per-s", type=float, default=25.0, help="KV transfer bandwidth between replicas")
    plan.add_argument("--kv-cache-gib", type=float, default=40.0, help="KV cache per decode replica")
    plan.add_argument("--ttft-slo-ms", type=float, required=True)
    plan.add_argument("--tpot-slo-ms", type=float, required=True)
    plan.add_argument("--hit-rate", type=float, default=0.0, help="share of prompt tokens already cached")
    plan.add_argument("--overhead-ms", type=float, default=0.0, help="the serving path's own cost per request")
    plan.add_argument(
        "--shared-prefix", action="store_true", help="estimate the hit rate with the placement simulator instead"
    )
    plan.set_defaults(run=_plan)
    serve_bench = suites.add_parser(
        "serve", help="load a running pdserve (or one started here) with a workload, over HTTP or gRPC"
    )
    _add_config_flags(serve_bench)
    _add_load_flags(serve_bench)
    serve_bench.add_argument("--url", help="HTTP base URL of a running pdserve (default: start one here)")
    serve_bench.add_argument("--grpc-address", help="its gRPC address host:port (for --api grpc)")
    serve_bench.add_argument(
        "--out", nargs="?", const=Path("bench/results/serve"), type=Path, metavar="DIR",
        help="write summary.json, records.json and CDF plots there (default: bench/results/serve)",
    )  # fmt: skip
    serve_bench.set_defaults(run=_bench_serve)
    compare_bench = suites.add_parser("compare", help="one workload against several configurations, one report")
    _add_config_flags(compare_bench)
    _add_load_flags(compare_bench)
    compare_bench.add_argument("--variants", choices=("modes", "policies"), default="modes",
                               help="modes: colocated vs disaggregated; policies: round_robin, least_loaded, "
                                    "prefix_aware on four replicas")  # fmt: skip
    compare_bench.add_argument("--out", type=Path, help="report folder (default: bench/results/compare-VARIANTS)")
    compare_bench.set_defaults(run=_bench_compare)
    questions_bench = suites.add_parser(
        "questions", help="ITL under interference, goodput, placement: the three answers (~20 min)"
    )
    _add_config_flags(questions_bench)
    questions_bench.add_argument("--rounds", type=int, default=3, help="rounds of the placement comparison")
    questions_bench.add_argument("--out", type=Path, default=Path("bench/results"), help="where the answers go")
    questions_bench.set_defaults(run=_bench_questions)
    overhead_bench = suites.add_parser("overhead", help="TTFT through the service vs the engine in-process")
    _add_config_flags(overhead_bench)
    overhead_bench.add_argument(
        "--json", nargs="?", const=Path("bench/results/overhead.json"), type=Path, metavar="PATH",
        help="also write the figures as JSON (default path: bench/results/overhead.json)",
    )  # fmt: skip
    overhead_bench.set_defaults(run=_bench_overhead)
    soak_bench = suites.add_parser(
        "soak", help="bounded mixed load with cancels: no errors, no memory growth, KV pools back to baseline"
    )
    _add_config_flags(soak_bench)
    soak_bench.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    soak_bench.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    soak_bench.add_argument("--warmup-s", type=float, default=180.0, help="memory is compared from then on")
    soak_bench.add_argument("--seed", type=int, default=0)
    _add_json_dir_flag(soak_bench, "soak.json")
    soak_bench.set_defaults(run=_bench_soak)
    vllm_bench = suites.add_parser(
        "vllm", help="raw vLLM's server vs pdserve up (colocated, disaggregated), one outside client (~7 min a round)"
    )
    _add_model_flag(vllm_bench)
    vllm_bench.add_argument("--port", type=int, default=8000, help="HTTP port each server takes in turn")
    vllm_bench.add_argument(
        "--rounds", type=int, default=3, help="times the three servers run in turn; figures are their medians"
    )
    _add_json_dir_flag(vllm_bench, "vllm_compare.json")
    vllm_bench.set_defaults(run=_bench_vllm)
    layers_bench = suites.add_parser(
        "layers", help="one lone request's time to first token, layer by layer, beside raw vLLM's (~5 min a round)"
    )
    _add_model_flag(layers_bench)
    layers_bench.add_argument("--port", type=int, default=8000, help="HTTP port each server takes in turn")
    layers_bench.add_argument("--requests", type=int, default=60, help="timed lone requests per layer (≥ 10)")
    layers_bench.add_argument("--rounds", type=int, default=2, help="times the servers run in turn; medians")
    _add_json_dir_flag(layers_bench, "request_layers.json")
    layers_bench.set_defaults(run=_bench_layers)
    autoscale_bench = suites.add_parser(
        "autoscale", help="a step load: fixed pools sized for the peak vs Serve's default policy vs pdserve's"
    )
    _add_config_flags(autoscale_bench)
    autoscale_bench.add_argument(
        "--engine", choices=("vllm", "simulated"), default="vllm",
        help="vLLM at 2 + 2 replicas most, or the simulated engine at 4 + 8 on its own four-phase trace (~20 min)",
    )  # fmt: skip
    autoscale_bench.add_argument("--low-rate", type=float, help="vLLM: requests per second, low phases (0.5)")
    autoscale_bench.add_argument("--high-rate", type=float, help="vLLM: requests per second, high phase (2)")
    autoscale_bench.add_argument("--phase-s", type=float, nargs=3, metavar="S",
                                 help="vLLM: seconds of the low, high and low phases (45 75 75)")  # fmt: skip
    autoscale_bench.add_argument("--max-replicas", type=int, help="vLLM: per worker pool, the fixed sizing (2)")
    autoscale_bench.add_argument("--seed", type=int, default=0)
    _add_json_dir_flag(autoscale_bench, "autoscale.json (autoscale_simulated.json)")
    autoscale_bench.set_defaults(run=_bench_autoscale)
    simulator_bench = suites.add_parser(
        "simulator", help="the simulated engine against vLLM here: a profile measured, then TTFT and TPOT of both"
    )
    _add_config_flags(simulator_bench)
    simulator_bench.add_argument(
        "--link-gb-per-s", type=float, default=1.2,
        help="the KV link of the profile (pdserve bench transfer measured gRPC on loopback at 1.2 GB/s here)",
    )  # fmt: skip
    simulator_bench.add_argument("--profile-out", type=Path, default=Path("bench/results/cpu_profile.json"),
                                 help="where the measured profile goes (for engine.simulated_profile)")  # fmt: skip
    simulator_bench.add_argument("--rounds", type=int, default=2,
                                 help="real and simulated runs in turn this many times; medians kept")  # fmt: skip
    _add_json_dir_flag(simulator_bench, "simulator.json")
    simulator_bench.set_defaults(run=_bench_simulator)
    placement_bench = suites.add_parser(
        "placement", help="placement policies in the service at 8 prefill + 16 decode workers, and the oracle"
    )
    _add_config_flags(placement_bench)
    placement_bench.add_argument(
        "--engine", choices=["simulated"], default="simulated",
        help="the simulated engine (24 vLLM engines do not fit this machine)",
    )  # fmt: skip
    placement_bench.add_argument("--tenants", type=int, default=16, help="tenants, each with a shared context")
    placement_bench.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson)")
    placement_bench.add_argument("--duration-s", type=float, default=60.0, help="seconds of arrivals per policy")
    placement_bench.add_argument("--time-scale", type=float, default=10.0, help="the hardware profile slowed so much")
    placement_bench.add_argument("--prefill-workers", type=int, default=8, help="simulated prefill replicas")
    placement_bench.add_argument("--decode-workers", type=int, default=16, help="simulated decode replicas")
    placement_bench.add_argument("--seed", type=int, default=0)
    _add_json_dir_flag(placement_bench, "placement_live.json")
    placement_bench.set_defaults(run=_bench_placement)
    return parser


def _add_json_dir_flag(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--json", nargs="?", const=Path("bench/results"), type=Path, metavar="DIR",
        help=f"also write {name} there (default: bench/results)",
    )  # fmt: skip


def _add_model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="Hugging Face model directory or repo id (org/name); default: a tiny model made on each node"
    )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file")
    _add_model_flag(parser)
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--cpu-cores", help="cores the engine binds to, e.g. 0-1")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, e.g. engine.kv_cache_gib=2"
    )


def _config(args: argparse.Namespace, flags: dict | None = None) -> PdserveConfig:
    overrides = {
        **(flags or {}),
        "engine.model": args.model,
        "engine.dtype": args.dtype,
        "engine.block_size": args.block_size,
        "engine.max_model_len": args.max_model_len,
        "engine.cpu_cores": args.cpu_cores,
    }
    overrides.update(parse_assignment(item) for item in args.set)
    return _load_config(args.config, overrides)


def _load_config(path: Path | None, overrides: dict) -> PdserveConfig:
    """The config from file, env and ``overrides``; this command's logging set from it."""
    config = load_config(path, os.environ, overrides)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if config.log_level != "DEBUG":  # libraries' deprecation notices are for their developers, not ours
        warnings.filterwarnings("ignore", category=FutureWarning)
    return config


def _make_model(args: argparse.Namespace) -> int:
    from engine.tiny_model import make_model

    base = PRESETS[args.preset]
    fields = ("arch", "vocab_size", "hidden_size", "layers", "heads", "kv_heads", "seed")
    changes = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    out = make_model(args.dir, ModelShape(**{**base.__dict__, **changes}))
    print(out)
    return 0


def _up(args: argparse.Namespace) -> int:
    from engine.core_ledger import omp_bind
    from pdserve.app import layout
    from pdserve.up import confined_to, run_until_interrupted, start

    flags = {"service.mode": args.mode, "router.index.redis_url": args.redis, "service.http_port": args.http_port,
             "service.grpc_port": args.grpc_port}  # fmt: skip
    config = _config(args, flags)
    layouts = layout(config)  # bad engine settings stop here, before Ray or any replica starts
    for pool in layouts.values():
        print(f"pdserve: {pool.describe()}", flush=True)
    if serving := confined_to(config, layouts):
        print(f"pdserve: Ray, Serve, the router and the engine cores on core(s) {omp_bind([serving])}", flush=True)
    print("pdserve: starting Ray and the Serve app…", flush=True)
    service = start(config, num_cpus=args.num_cpus, layouts=layouts)
    where = f"HTTP {service.http_url}/v1  gRPC {service.grpc_address}"
    print(f"pdserve is up: {where}  ({config.service.mode})", flush=True)
    if args.try_prompt:
        keys = config.router.api_keys
        _try(service, args.try_prompt, keys[0].get_secret_value() if keys else None)
    if args.exit:
        service.stop()
        return 0
    print("pdserve: serving until Ctrl-C", flush=True)
    run_until_interrupted(service)
    return 0


def _serve_config(args: argparse.Namespace) -> int:
    """The Serve config of this pdserve config: the app-level policy when the pools are coordinated,
    and no secret (the nodes give them as env)."""
    import yaml

    from pdserve.app import serve_application, serve_ingress

    config = _config(args)
    print(
        yaml.safe_dump({**serve_ingress(config.service), "applications": [serve_application(config)]}, sort_keys=False)
    )
    return 0


def _try(service, prompt: str, api_key: str | None) -> None:
    """One real request over each API, so a first run shows the service answering."""
    import json
    import urllib.request

    from pdserve.client import GenerationClient

    client = GenerationClient(service.grpc_address, api_key=api_key)
    try:
        replies = list(client.generate(prompt, max_tokens=16, temperature=0.0))
    finally:
        client.close()
    timing = replies[-1].timing
    print(f"gRPC  Generate: {prompt!r} → {''.join(r.text for r in replies)!r} "
          f"[{timing.placement}, ttft {1000 * timing.ttft_s:.0f} ms]")  # fmt: skip
    body = json.dumps({"prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(f"{service.http_url}/v1/completions", body, headers)
    with urllib.request.urlopen(request, timeout=300) as reply:
        answer = json.loads(reply.read())
    print(f"HTTP  /v1/completions: {prompt!r} → {answer['choices'][0]['text']!r}", flush=True)


def _generate(args: argparse.Namespace) -> int:
    if args.local:
        from pdserve.models import resolve_model

        config = resolve_model(_config(args))
        return asyncio.run(_stream_completion(config, args))
    import grpc

    from pdserve.client import API_KEY_ENV, GenerationClient

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.top_k != -1:
        sampling["top_k"] = args.top_k
    if args.seed is not None:
        sampling["seed"] = args.seed
    client = GenerationClient(args.address, api_key=os.environ.get(API_KEY_ENV))
    try:
        for prompt in args.prompts:
            last = None
            for last in client.generate(prompt, **sampling):
                sys.stdout.write(last.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            t = last.timing
            print(f"[{last.usage.completion_tokens} tokens, finish={last.finish_reason}, {t.placement}, "
                  f"ttft={1000 * t.ttft_s:.0f} ms, total={t.e2e_s:.2f} s]", file=sys.stderr)  # fmt: skip
    except grpc.RpcError as exc:
        print(f"\npdserve: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.client import API_KEY_ENV, GenerationClient

    client = GenerationClient(args.address, api_key=os.environ.get(API_KEY_ENV))
    try:
        status = client.status()
    except grpc.RpcError as exc:
        print(f"pdserve: {args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    hit = status.prefix_hit_tokens / status.prompt_tokens if status.prompt_tokens else 0.0
    index = "available" if status.index_available else "UNAVAILABLE"
    print(f"model {status.model}  mode {status.mode}  policy {status.policy}  running {status.requests_running}  "
          f"held for prefill {status.prefill_held_requests} ({status.prefill_held_tokens} tokens)")  # fmt: skip
    print(f"index {index} (outages {status.index_outages})  prefix hit rate {hit:.1%} "
          f"({status.prefix_hit_tokens}/{status.prompt_tokens} prompt tokens)")  # fmt: skip
    size = sum(w.cached_blocks for w in status.workers)
    print(f"index size {size} blocks over {len(status.workers)} live workers")
    print(f"{'pool':8} {'worker':34} {'running':>7} {'waiting':>7} {'queued':>7} {'kv use':>7} {'cached':>7} "
          f"{'placed':>7} cores")  # fmt: skip
    for w in status.workers:
        print(f"{w.role:8} {w.worker_id:34} {w.running_seqs:7} {w.waiting_seqs:7} {w.queued_prefill_tokens:7} "
              f"{w.kv_used_fraction:7.1%} {w.cached_blocks:7} {w.in_flight:7} {w.cpu_cores or '-'}")  # fmt: skip
    return 0


async def _stream_completion(config: PdserveConfig, args: argparse.Namespace) -> int:
    from engine.engine import Engine
    from engine.types import GenerateRequest, SamplingOptions

    engine = Engine(config.engine)
    try:
        sampling = SamplingOptions(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
        for prompt in args.prompts:
            request = GenerateRequest(uuid.uuid4().hex, engine.encode(prompt), sampling)
            start = time.perf_counter()
            first = None
            async for delta in engine.generate(request):
                first = first or time.perf_counter()
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            elapsed = time.perf_counter() - start
            sys.stdout.write("\n")
            print(
                f"[{len(request.prompt_token_ids)} prompt tokens, {delta.completion_tokens} tokens, "
                f"finish={delta.finish_reason}, ttft={1000 * ((first or start) - start):.0f} ms, "
                f"total={elapsed:.2f} s]",
                file=sys.stderr,
            )
    finally:
        engine.shutdown()
    return 0


def _bench_engine(args: argparse.Namespace) -> int:
    from bench.engine_bench import run_engine_bench

    config = _bench_config(args)
    run_engine_bench(config.engine, requests=args.requests, repeats=args.repeats, json_path=args.json)
    return 0


def _bench_router(args: argparse.Namespace) -> int:
    from bench.router_bench import run_router_bench

    if args.engine is not None and not args.service:
        raise ConfigError("--engine: it picks the service's engine, so it needs --service")
    service = _bench_config(args) if args.service else None
    run_router_bench(
        args.workers, args.index_blocks, args.decisions, args.routers, args.view_delay_ms / 1000, args.json, service,
        args.engine or "vllm",
    )  # fmt: skip
    return 0


def _bench_transfer(args: argparse.Namespace) -> int:
    import torch

    from bench.transfer_bench import run_transfer_bench

    if args.device == "cuda" and not torch.cuda.is_available():
        print("pdserve bench transfer: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    model = None if args.no_handoff else Path(_bench_config(args).engine.model)
    run_transfer_bench(args.repeats, args.block_pulls, model, args.json, args.device)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from bench.placement_sim import SharedPrefixTrace
    from bench.plan import PlanError, PlanInput, plan

    spec = PlanInput(
        args.rate, args.input_tokens, args.output_tokens, args.prefill_tokens_per_s, args.decode_tokens_per_s,
        args.decode_step_ms, args.kv_bytes_per_token, args.link_gb_per_s, args.kv_cache_gib, args.ttft_slo_ms,
        args.tpot_slo_ms, hit_rate=None if args.shared_prefix else args.hit_rate, overhead_ms=args.overhead_ms,
        trace=SharedPrefixTrace() if args.shared_prefix else None,
    )  # fmt: skip
    try:
        result = plan(spec)
    except PlanError as exc:
        print(f"pdserve plan: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=2))
    print(f"prefill {result.prefill.replicas} : decode {result.decode.replicas} replicas (ratio {result.ratio}); "
          f"TTFT p90 ~{result.prefill.predicted_ms:.0f} ms, TPOT ~{result.decode.predicted_ms:.1f} ms")  # fmt: skip
    return 0


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    from bench.workloads import WORKLOADS

    parser.add_argument("--workload", choices=list(WORKLOADS), default="random")
    parser.add_argument("--requests", type=int, default=64, help="requests in the workload")
    parser.add_argument(
        "--input-tokens", type=int, default=512, help="mean prompt length (the question, with a prefix)"
    )
    parser.add_argument("--output-tokens", type=int, default=64, help="mean output length")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--rate", help="open loop: Poisson arrivals, sessions per second (default 2); a sweep: 0.5,1,2")
    loop.add_argument("--users", type=int, help="closed loop: this many concurrent users")
    parser.add_argument("--api", choices=("http", "grpc"), default="http")
    parser.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO for goodput (with --slo-tpot-ms)")
    parser.add_argument("--slo-tpot-ms", type=float, help="TPOT SLO for goodput")


def _load_args(args: argparse.Namespace):
    from bench.load import SLO, LoadSpec
    from bench.workloads import WorkloadSpec

    workload = WorkloadSpec(args.workload, args.requests, args.input_tokens, args.output_tokens, seed=args.seed)
    if args.users is not None:
        loads = [LoadSpec(args.api, None, args.users, args.seed)]
    else:
        try:
            rates = [float(rate) for rate in (args.rate or "2").split(",")]
        except ValueError:
            raise ConfigError(f"--rate {args.rate!r}: expected a number or a comma-separated list") from None
        if any(rate <= 0 for rate in rates):
            raise ConfigError(f"--rate {args.rate!r}: rates must be positive")
        loads = [LoadSpec(args.api, rate, None, args.seed) for rate in rates]
    if (args.slo_ttft_ms is None) != (args.slo_tpot_ms is None):
        raise ConfigError("give both --slo-ttft-ms and --slo-tpot-ms, or neither")
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms) if args.slo_ttft_ms is not None else None
    return workload, loads, slo


def _bench_config(args: argparse.Namespace) -> PdserveConfig:
    from pdserve.models import resolve_model

    return resolve_model(_config(args), preset="bench")


def _defaults_with_model(args: argparse.Namespace) -> PdserveConfig:
    """pdserve's defaults with ``--model`` (the bench model when absent): for the benchmarks against raw vLLM,
    whose `pdserve up` runs on its defaults and takes no other setting."""
    from pdserve.models import resolve_model

    return resolve_model(_load_config(None, {"engine.model": args.model}), preset="bench")


def _bench_serve(args: argparse.Namespace) -> int:
    from bench.serve_bench import run_serve

    workload, loads, slo = _load_args(args)
    if args.url is not None and args.api == "grpc" and not args.grpc_address:
        raise ConfigError("--api grpc against --url needs --grpc-address")
    config = _config(args) if args.url is not None else _bench_config(args)  # a running service has its model
    run_serve(config, workload, loads, slo, args.out, args.url, args.grpc_address)
    return 0


def _bench_compare(args: argparse.Namespace) -> int:
    from bench.compare import VARIANT_SETS, run_compare

    workload, loads, slo = _load_args(args)
    if len(loads) > 1:
        raise ConfigError("bench compare runs one load: give one --rate")
    load = loads[0]
    out = args.out or Path(f"bench/results/compare-{args.variants}")
    report = run_compare(_bench_config(args), VARIANT_SETS[args.variants], workload, load, slo, out)
    print(json.dumps(report["ratios_to_first"], indent=2))
    print(f"wrote {out}/report.md")
    return 0


def _bench_questions(args: argparse.Namespace) -> int:
    from bench.questions import run_questions

    answers = run_questions(_bench_config(args), args.out, args.rounds)
    keys = ("itl_p99_disagg_vs_colocated", "goodput_disagg_vs_colocated", "ttft_p50_round_robin_vs_prefix_aware")
    print(json.dumps({key: answers[key] for key in keys}, indent=2))
    print(f"wrote {args.out}/questions.json and questions.md")
    return 0


def _bench_overhead(args: argparse.Namespace) -> int:
    from bench.serve_bench import run_overhead

    run_overhead(_bench_config(args), args.json)
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from bench.running import with_service
    from bench.soak import SoakSpec, soak, write
    from pdserve.app import model_info

    spec = SoakSpec(clients=args.clients, duration_s=60 * args.minutes, warmup_s=args.warmup_s, seed=args.seed)
    config = _bench_config(args)
    keys = config.router.api_keys
    key = keys[0].get_secret_value() if keys else None
    result = with_service(config, {}, lambda service: soak(service, spec, model_info(config.engine).vocab_size, key))
    print(json.dumps(result, indent=2))
    if args.json is not None:
        print(f"wrote {write(result, args.json)}")
    return 0 if result["passed"] else 1


def _bench_vllm(args: argparse.Namespace) -> int:
    from bench.vllm_compare import TARGETS, run

    config = _defaults_with_model(args)
    result = run(Path(config.engine.model), args.json, args.port, config.engine.kv_cache_gib, args.rounds)
    for key, (bound, kind) in TARGETS.items():
        for suffix in ("", "_prefix"):
            value = result.get(key + suffix)
            met = value is not None and (value >= bound if kind == "min" else value <= bound)
            print(f"{key + suffix:42s} {value!s:>8}  target {'≥' if kind == 'min' else '≤'} {bound}  "
                  f"{'met' if met else 'MISSED'}")  # fmt: skip
    return 0


def _bench_layers(args: argparse.Namespace) -> int:
    from bench.request_layers import run

    if args.requests < 10 or args.rounds < 1:
        raise ConfigError(f"--requests {args.requests} --rounds {args.rounds}: at least 10 requests and 1 round")
    engine = _defaults_with_model(args).engine
    result = run(Path(engine.model), args.json, args.port, args.requests, args.rounds, engine.kv_cache_gib)
    for key in ("vllm_http_ms", "router_http_ms", "router_ms", "decode_handle_ms", "serve_hop_ms",
                "engine_alone_ms", "replica_ms"):  # fmt: skip
        print(f"{key:18s} {result[key]:8.2f}")
    return 0


def _bench_autoscale(args: argparse.Namespace) -> int:
    from bench.autoscale import Phase, StepTrace, run_autoscale, simulated_trace, write
    from pdserve.app import model_info

    shaped = {"--low-rate": args.low_rate, "--high-rate": args.high_rate, "--phase-s": args.phase_s,
              "--max-replicas": args.max_replicas}  # fmt: skip
    if args.engine == "simulated":
        given = [flag for flag, value in shaped.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: the simulated engine runs its own trace (bench/autoscale.py)")
        trace = simulated_trace(args.seed)
    else:  # StepTrace's own low, high, low phases, with what was given in their place
        base = StepTrace()
        low, high, tail = args.phase_s if args.phase_s is not None else [p.seconds for p in base.phases]
        low_rate = base.phases[0].rate if args.low_rate is None else args.low_rate
        high_rate = base.phases[1].rate if args.high_rate is None else args.high_rate
        most = base.max_decode_replicas if args.max_replicas is None else args.max_replicas
        if min(low, high, tail, low_rate, high_rate, most) <= 0:
            raise ConfigError("--low-rate, --high-rate, --phase-s and --max-replicas must be positive")
        phases = (Phase(low_rate, low), Phase(high_rate, high), Phase(low_rate, tail))
        trace = StepTrace(phases=phases, max_prefill_replicas=most, max_decode_replicas=most, seed=args.seed)
    config = _bench_config(args)
    result = run_autoscale(config, trace, model_info(config.engine).vocab_size, args.engine)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    if args.json is not None:
        print(f"wrote {write(result, args.json)}")
    return 0


def _bench_simulator(args: argparse.Namespace) -> int:
    from bench.simulator_check import run_simulator_check, write
    from pdserve.app import model_info

    config = _bench_config(args)
    vocab_size = model_info(config.engine).vocab_size
    result = run_simulator_check(config, vocab_size, args.link_gb_per_s * 1e9, args.profile_out, args.rounds)
    print(json.dumps({k: v for k, v in result.items() if k != "profiles"}, indent=2))
    print(f"wrote {args.profile_out} (the last round's profile)")
    if args.json is not None:
        print(f"wrote {write(result, args.json)}")
    return 0


def _bench_placement(args: argparse.Namespace) -> int:
    from bench.placement_live import ClusterShape, TenantTrace, run_placement, write
    from pdserve.app import model_info

    if min(args.prefill_workers, args.decode_workers) <= 0:
        raise ConfigError("--prefill-workers and --decode-workers must be at least 1")
    trace = TenantTrace(tenants=args.tenants, rate_per_s=args.rate, duration_s=args.duration_s, seed=args.seed)
    config = _bench_config(args)
    shape = ClusterShape(args.prefill_workers, args.decode_workers, time_scale=args.time_scale)
    result = run_placement(config, trace, shape, model_info(config.engine).vocab_size)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    if args.json is not None:
        print(f"wrote {write(result, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
