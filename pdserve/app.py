"""The Serve application: Router → PrefillWorker, DecodeWorker, wired from one ``PdserveConfig``.

``build_app`` is what ``pdserve up`` runs; ``app_builder`` is the import path a
Serve config file names (``import_path: pdserve.app:app_builder``), its ``args``
being the same config schema. The Serve config's ``deployments:`` section may
still override each deployment's replicas or autoscaling, by name.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.serve.config import RequestRouterConfig

from decode_worker.deployment import DecodeWorker
from engine.config import EngineConfig, KVConnectorSpec
from engine.hosting import WorkerSettings
from kv_transfer.vllm_connector import TOKEN_ENV
from pdserve.config import PdserveConfig, PoolConfig, ServiceConfig, load_config
from pdserve.models import resolve_model
from prefill_worker.deployment import PrefillWorker
from router.index.reporting import IndexReporting
from router.ingress import IngressSettings, Router
from router.replica_routing import ROUTER_CLASS
from router.service import ModelInfo

CONNECTOR = dict(module_path="kv_transfer.vllm_connector", class_name="PdserveConnector")


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy``: ``args`` is a pdserve config, env on top."""
    return build_app(load_config(env=os.environ, data=args))


def build_app(config: PdserveConfig) -> serve.Application:
    config = resolve_model(config)
    service = config.service
    token = config.cluster_token or SecretStr(os.environ.get(TOKEN_ENV) or secrets.token_hex(16))
    model = model_info(config.engine)
    reporting = IndexReporting(
        model.model_id, config.router.index.redis_url, config.router.index.heartbeat_ttl_s,
        config.router.index.timeout_s, service.app_name,
    )  # fmt: skip
    disaggregated = service.mode == "disaggregated" and service.prefill.present
    split = _core_split(disaggregated)
    cores = {name: split[name] if pool.cpu_cores == "auto" else pool.cpu_cores
             for name, pool in (("decode", service.decode), ("prefill", service.prefill))}  # fmt: skip
    decode = DecodeWorker.options(**_pool_options(service.decode, "decode", cores["decode"])).bind(
        _engine_for(config, service.decode, "kv_consumer" if disaggregated else None, cores["decode"]),
        _worker_settings(service, service.decode, reporting, token),
    )
    prefill = None
    if disaggregated:
        prefill = PrefillWorker.options(**_pool_options(service.prefill, "prefill", cores["prefill"])).bind(
            _engine_for(config, service.prefill, "kv_producer", cores["prefill"]),
            _worker_settings(service, service.prefill, reporting, token),
        )
    settings = IngressSettings(
        model=model, router=config.router, mode=service.mode if disaggregated else "colocated",
        grpc_host=service.grpc_host, grpc_port=service.grpc_port, max_inflight=service.max_inflight,
        prefill_timeout_s=service.prefill_timeout_s,
    )  # fmt: skip
    router_pool = service.router
    router = Router.options(
        **_scaling(router_pool),
        ray_actor_options={"num_cpus": router_pool.num_cpus, "resources": router_pool.resources},
        max_ongoing_requests=router_pool.max_ongoing_requests,
    )
    return router.bind(settings, prefill, decode)


def serve_application(config: PdserveConfig) -> dict[str, Any]:
    """``config`` as an application of a Serve config (what ``serve deploy`` / ``serve run`` take), with
    the app-level autoscaling policy when the pools are coordinated. No secret goes in: Serve shows an
    application's args to whoever can query it, so the nodes give them as env (``PDSERVE_CLUSTER_TOKEN``,
    ``PDSERVE_ROUTER__API_KEYS``)."""
    private = {"cluster_token": True, "ray_address": True, "ray_metrics_export_port": True, "router": {"api_keys"}}
    application = {
        "name": config.service.app_name,
        "route_prefix": "/",
        "import_path": "pdserve.app:app_builder",
        "args": config.model_dump(mode="json", exclude=private),
    }
    if config.service.coordination is not None:
        application["autoscaling_policy"] = config.service.coordination.serve_policy()
    return application


def model_info(engine: EngineConfig) -> ModelInfo:
    """The figures the router validates against, read from the model directory."""
    hf = json.loads((engine.model / "config.json").read_text())
    context = engine.max_model_len or hf.get("max_position_embeddings") or 2048
    return ModelInfo(engine.served_model_id, str(engine.model), engine.block_size, context, hf["vocab_size"])


def _engine_for(config: PdserveConfig, pool: PoolConfig, role: str | None, cores: str | None) -> EngineConfig:
    transfer = config.service.transfer
    connector = None
    if role is not None:
        extra = transfer.model_dump()  # lease_s, stall_timeout_s, backends: the connector's own knobs
        connector = KVConnectorSpec(**CONNECTOR, role=role, extra=extra)
    update: dict[str, Any] = {"kv_connector": connector, "cpu_cores": cores}
    if pool.kv_cache_gib is not None:
        update["kv_cache_gib"] = pool.kv_cache_gib
    return config.engine.model_copy(update=update)


def _worker_settings(service: ServiceConfig, pool: PoolConfig, reporting: IndexReporting, token) -> WorkerSettings:
    # Half the graceful-shutdown budget for peers to pull the KV still offered; the other half for calls to end.
    return WorkerSettings(
        reporting, token, service.heartbeat_s, pool.graceful_shutdown_timeout_s / 2, service.test_die_on_token
    )


def _pool_options(pool: PoolConfig, role: str, cores: str | None) -> dict[str, Any]:
    """Serve options of a worker pool. The cluster token is a constructor argument, not an env var:
    Ray's runtime-env agent logs the env vars it sets."""
    env = {}
    if cores is not None:
        # Ray sets OMP_NUM_THREADS from num_cpus (a scheduling figure); the engine's threads are its bound cores.
        env["OMP_NUM_THREADS"] = str(_core_count(cores))
    return {
        **_scaling(pool, role),
        "max_ongoing_requests": pool.max_ongoing_requests,
        "graceful_shutdown_timeout_s": pool.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,  # how often a draining replica looks whether its calls ended
        "ray_actor_options": {
            "num_cpus": pool.num_cpus,
            "num_gpus": pool.num_gpus,
            "resources": pool.resources,
            "runtime_env": {"env_vars": env},
        },
        # Placement picks the replica; Serve's request router only carries that choice out.
        "request_router_config": RequestRouterConfig(request_router_class=ROUTER_CLASS),
    }


def _scaling(pool: PoolConfig, role: str | None = None) -> dict[str, Any]:
    if pool.autoscaling is not None:
        return {"autoscaling_config": pool.autoscaling.serve_config(role)}
    if pool.autoscaling_config is not None:
        return {"autoscaling_config": pool.autoscaling_config}
    return {"num_replicas": pool.num_replicas}


def _core_split(disaggregated: bool) -> dict[str, str | None]:
    """``auto`` cores: this node's cores, halved between prefill and decode, so they never share one."""
    count = os.cpu_count() or 1
    if not disaggregated or count < 2:
        return {"prefill": None, "decode": _span(0, count)}
    half = count // 2
    return {"prefill": _span(0, half), "decode": _span(half, count)}


def _core_count(cores: str) -> int:
    """How many cores a VLLM_CPU_OMP_THREADS_BIND list names: '0-3' → 4, '0,2' → 2."""
    count = 0
    for part in cores.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def _span(first: int, end: int) -> str:
    return str(first) if end - first == 1 else f"{first}-{end - 1}"
