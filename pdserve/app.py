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
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.serve.config import RequestRouterConfig

from decode_worker.deployment import DecodeWorker
from engine.config import EngineConfig, KVConnectorSpec
from engine.hosting import WorkerSettings
from engine.model_source import CONFIG_FILES, ModelSource, ensure_model, pin_revision
from kv_transfer.handoff import TOKEN_ENV
from pdserve import engine_layout
from pdserve.config import PdserveConfig, PoolConfig, ServiceConfig, load_config
from pdserve.engine_layout import PoolLayout
from pdserve.models import model_source
from prefill_worker.deployment import PrefillWorker
from router.index.reporting import IndexReporting
from router.ingress import IngressSettings, Router
from router.replica_routing import ROUTER_CLASS
from router.service import ModelInfo

NODE_CORES_ARG = "node_cores"  # an app arg beside the config's own: see serve_application
CONNECTORS = {  # by engine.kind: the engine loads its connector by module path
    "vllm": dict(module_path="kv_transfer.vllm_connector", class_name="PdserveConnector"),
    "simulated": dict(module_path="kv_transfer.sim_connector", class_name="SimulatedKV"),
}


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy``: ``args`` is a pdserve config, env on top, and the
    node's cores where ``pdserve up`` confined its cluster (``serve_application``)."""
    config = {name: value for name, value in args.items() if name != NODE_CORES_ARG}
    return build_app(load_config(env=os.environ, data=config), args.get(NODE_CORES_ARG))


def build_app(config: PdserveConfig, node_cores: list[int] | None = None) -> serve.Application:
    """The app, built on whichever node runs this: every replica gets the model's source and makes the model
    present on its own node; this node reads only its ``config.json``, for the checks and the router's figures."""
    source = model_source(config)
    config_dir = ensure_model(source, CONFIG_FILES)
    source = pin_revision(source, config_dir)  # every replica, whenever it starts, loads the commit resolved here
    # The name every replica serves and hashes under, decided once (a hub snapshot's directory is named by its commit).
    engine = config.engine.model_copy(update={"model_id": config.engine.model_id or source.name})
    config = config.model_copy(update={"engine": engine})
    service = config.service
    token = config.cluster_token or SecretStr(os.environ.get(TOKEN_ENV) or secrets.token_hex(16))
    hf = json.loads((config_dir / "config.json").read_text())
    model = model_info(config.engine.model_copy(update={"model": str(config_dir)}), hf)
    reporting = IndexReporting(model.model_id, config.router.index, token, service.app_name)
    disaggregated = service.mode == "disaggregated" and service.prefill.present
    # The commit pinned above, read once, not the model's source resolved again.
    layouts = layout(config, hf, node_cores)
    decode = DecodeWorker.options(**_pool_options(service.decode, layouts["decode"])).bind(
        _engine_for(config, layouts["decode"], "kv_consumer" if disaggregated else None),
        _worker_settings(service, service.decode, layouts["decode"], reporting, token, source),
    )
    prefill = None
    if disaggregated:
        prefill = PrefillWorker.options(**_pool_options(service.prefill, layouts["prefill"])).bind(
            _engine_for(config, layouts["prefill"], "kv_producer"),
            _worker_settings(service, service.prefill, layouts["prefill"], reporting, token, source),
        )
    settings = IngressSettings(
        model=model, router=config.router, cluster_token=token, model_source=source,
        mode=service.mode if disaggregated else "colocated",
        grpc_host=service.grpc_host, grpc_port=service.grpc_port, max_inflight=service.max_inflight,
        http=(service.http_host, service.http_port) if service.http_server == "router" else None,
        http_grace_s=service.router.graceful_shutdown_timeout_s / 2,  # the rest: gRPC and the index writer
        prefill_timeout_s=service.prefill_timeout_s,
    )  # fmt: skip
    router_pool = service.router
    router = Router.options(
        **_router_scaling(service),
        ray_actor_options={"num_cpus": router_pool.num_cpus, "resources": router_pool.resources},
        max_ongoing_requests=router_pool.max_ongoing_requests,
        graceful_shutdown_timeout_s=router_pool.graceful_shutdown_timeout_s,
    )
    return router.bind(settings, prefill, decode)


def serve_ingress(service: ServiceConfig) -> dict[str, Any]:
    """Serve's own HTTP proxy for ``service.http_server``: off where the router replicas serve HTTP themselves
    (they take the port), else on every node at ``http_host:http_port``. The keys of ``serve.start`` and of a
    Serve config alike."""
    if service.http_server == "router":
        return {"proxy_location": "Disabled"}
    return {"proxy_location": "EveryNode", "http_options": {"host": service.http_host, "port": service.http_port}}


def serve_application(config: PdserveConfig, node_cores: list[int] | None = None) -> dict[str, Any]:
    """``config`` as an application of a Serve config (what ``serve deploy`` / ``serve run`` take), with
    the app-level autoscaling policy when the pools are coordinated. No secret goes in: Serve shows an
    application's args to whoever can query it, so the nodes give them as env (``PDSERVE_CLUSTER_TOKEN``,
    ``PDSERVE_ROUTER__API_KEYS``).

    ``node_cores``: the cores to lay the engines out over, where the process that builds the app (Serve's
    controller) cannot see them: ``pdserve up`` confines its local cluster to the reserved core."""
    private = {"cluster_token": True, "ray_address": True, "ray_metrics_export_port": True, "router": {"api_keys"}}
    application = {
        "name": config.service.app_name,
        "route_prefix": "/",
        "import_path": "pdserve.app:app_builder",
        # What was given only: defaults apply again where it is loaded, and a default is not taken for a value
        # given (engine.kv_cache_gib on a GPU pool is refused only when given).
        "args": config.model_dump(mode="json", exclude=private, exclude_unset=True),
    }
    if node_cores:
        application["args"][NODE_CORES_ARG] = node_cores
    if config.service.coordination is not None:
        application["autoscaling_policy"] = config.service.coordination.serve_policy()
    return application


def model_info(engine: EngineConfig, hf: dict | None = None) -> ModelInfo:
    """The figures the router validates against: ``hf`` (the model's ``config.json``) where read already, else
    read from ``engine.model``, a directory on this node."""
    hf = hf if hf is not None else json.loads((Path(engine.model) / "config.json").read_text())
    context = engine.max_model_len or hf.get("max_position_embeddings") or 2048
    return ModelInfo(engine.served_model_id, engine.model, engine.block_size, context, hf["vocab_size"],
                     engine.tool_call_parser)  # fmt: skip


def layout(config: PdserveConfig, hf: dict | None = None, node_cores: list[int] | None = None) -> dict[str, PoolLayout]:
    """Each worker pool's engine and cores (over ``node_cores``, else this process's), checked (``ConfigError``)
    before any replica starts."""
    service = config.service
    roles = ["decode"] + (["prefill"] if service.mode == "disaggregated" and service.prefill.present else [])
    return engine_layout.plan(config, roles, _gpus_per_node(), hf, node_cores)


def _gpus_per_node() -> float:
    import ray

    if not ray.is_initialized():
        return 0.0
    return max((node["Resources"].get("GPU", 0.0) for node in ray.nodes() if node["Alive"]), default=0.0)


def _engine_for(config: PdserveConfig, pool: PoolLayout, role: str | None) -> EngineConfig:
    transfer = config.service.transfer
    connector = None
    if role is not None:
        extra = transfer.connector_extra()  # lease_s, stall_timeout_s, pull_timeout_s, backends, TLS: its own knobs
        connector = KVConnectorSpec(**CONNECTORS[pool.engine.kind], role=role, extra=extra)
    settings = getattr(config.service, pool.role)
    update: dict[str, Any] = {"kv_connector": connector}
    if settings.kv_cache_gib is not None:
        update["kv_cache_gib"] = settings.kv_cache_gib
    return pool.engine.model_copy(update=update)


def _worker_settings(
    service: ServiceConfig, pool: PoolConfig, layout: PoolLayout, reporting: IndexReporting, token,
    source: ModelSource,
) -> WorkerSettings:  # fmt: skip
    # Half the graceful-shutdown budget for peers to pull the KV still offered; the other half for calls to end.
    return WorkerSettings(
        reporting, token, source, service.heartbeat_s, pool.graceful_shutdown_timeout_s / 2,
        service.test_die_on_token, layout.cores, layout.shares_serving_cores,
    )  # fmt: skip


def _pool_options(pool: PoolConfig, layout: PoolLayout) -> dict[str, Any]:
    """Serve options of a worker pool. The cluster token is a constructor argument, not an env var:
    Ray's runtime-env agent logs the env vars it sets. A replica owns every device of its engine's
    ranks: its GPUs in one placement-group bundle (as Ray Serve LLM places a TP engine), or its cores."""
    tp = layout.engine.tensor_parallel_size
    options: dict[str, Any] = {
        **_scaling(pool, layout.role),
        "max_ongoing_requests": pool.max_ongoing_requests,
        "graceful_shutdown_timeout_s": pool.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,  # how often a draining replica looks whether its calls ended
        "ray_actor_options": {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus * tp, "resources": pool.resources},
        # Placement picks the replica; Serve's request router only carries that choice out.
        "request_router_config": RequestRouterConfig(request_router_class=ROUTER_CLASS),
    }
    if pool.num_gpus > 0 and tp > 1:
        bundle = {"CPU": pool.num_cpus, "GPU": pool.num_gpus * tp, **pool.resources}
        options["placement_group_bundles"] = [bundle]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def _router_scaling(service: ServiceConfig) -> dict[str, Any]:
    """The router pool's scaling. Under a coordinated policy a fixed router pool is an autoscaled one held at its
    size (min = max = its replicas), reporting as often as the prefill pool: Serve hands an application's policy
    only its autoscaled deployments, and the policy reads the prompts the routers hold for the prefill pool."""
    pool, prefill = service.router, service.prefill.autoscaling
    if service.coordination is None or prefill is None or pool.autoscaling or pool.autoscaling_config:
        return _scaling(pool)
    timing = prefill.model_dump(include={"look_back_period_s", "metrics_interval_s"})
    return {"autoscaling_config": {"min_replicas": pool.num_replicas, "max_replicas": pool.num_replicas, **timing}}


def _scaling(pool: PoolConfig, role: str | None = None) -> dict[str, Any]:
    if pool.autoscaling is not None:
        return {"autoscaling_config": pool.autoscaling.serve_config(role)}
    if pool.autoscaling_config is not None:
        return {"autoscaling_config": pool.autoscaling_config}
    return {"num_replicas": pool.num_replicas}
