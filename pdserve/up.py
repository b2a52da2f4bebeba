"""``pdserve up``: start (or join) Ray, start Redis when asked, run the Serve app, wait for Ctrl-C.

Ray's token authentication stays on: a local cluster started here makes its
token (``~/.ray/auth_token``) the way ``ray start`` does; joining a cluster
uses that cluster's token from the environment or that file.

A local cluster on a CPU node whose engines leave cores free (engine_layout.py)
is confined to those cores: Ray's daemons, Serve's controller and proxy, the
router and the worker replicas, with the vLLM engine cores they start, run on
the reserved core at the niceness ``pdserve up`` runs at, and only the rank
workers bind the rest, each its own. vLLM's server binds only its worker and runs
everything at one niceness (its API server and engine core may use any core).
Left free (Ray's workers at nice 15, anywhere), the engine core waited behind its
own rank worker at nice 0 on the rank's core: 2.0 s of scheduling delay over
2,800 wake-ups in a 16 s shared-prefix run, against 5 ms for vLLM's engine core
(``perf sched``, 2026-12-03; README, "Cores on CPU nodes").
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from pdserve.config import PdserveConfig, ServiceConfig
from pdserve.engine_layout import PoolLayout, serving_cores

log = logging.getLogger(__name__)


@dataclass
class Service:
    """A running pdserve: where it answers, and how to stop it."""

    config: PdserveConfig
    http_url: str
    grpc_address: str
    redis: object | None = None

    def stop(self, drain: bool = True) -> None:
        """Serve's graceful shutdown (in-flight requests drain), then Ray's. ``drain=False``, for a start that
        failed on a cluster started here: no drain, as Serve's would wait out a pool's
        ``graceful_shutdown_timeout_s`` (30 s) even for a replica that was never placed; stopping Ray ends
        every process of it, engines included."""
        import ray
        from ray import serve

        try:
            if drain or self.config.ray_address:
                serve.shutdown()
        finally:
            try:
                ray.shutdown()
            finally:  # the local Redis stops whatever Ray did
                if self.redis is not None:
                    self.redis.stop()


def start(
    config: PdserveConfig, num_cpus: int | None = None, ready_timeout_s: float = 300.0,
    layouts: dict[str, PoolLayout] | None = None,
) -> Service:  # fmt: skip
    """Start (or join) Ray and run the app; ``layouts``: the pools' as the caller planned them (``pdserve up``
    prints them), planned here when not given."""
    import ray
    from ray import serve

    from pdserve.app import build_app, layout, serve_ingress

    redis = None
    if config.router.index.redis_url == "local":
        from pdserve.local_redis import LocalRedis

        redis = LocalRedis(config.model_cache_dir.expanduser().parent / "redis").start()
        config = config.model_copy(
            update={"router": config.router.model_copy(
                update={"index": config.router.index.model_copy(update={"redis_url": redis.url})})}
        )  # fmt: skip
    service = config.service
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's driver-side INFO lines: quiet by default
    _quiet_ray_notices()
    node_cores = None  # the node's, for Serve's controller, where it builds the app on the reserved core alone
    if config.ray_address:
        _join_with_token()
        ray.init(address=config.ray_address, logging_level=logging.WARNING, log_to_driver=False)
    else:  # logical CPUs for every replica the pools may have, even on a 2-core machine; cores are bound per engine
        cpus = max(num_cpus or os.cpu_count() or 1, cpus_needed(service))
        secrets = config if service.coordination is not None else None
        confined = confined_to(config, layouts if layouts is not None else layout(config))
        if confined:
            node_cores = sorted(os.sched_getaffinity(0))
        with _secrets_in_env(secrets), _serving_processes_on(confined):
            ray.init(
                num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                _metrics_export_port=config.ray_metrics_export_port,
            )  # fmt: skip
    running = Service(
        config, f"http://{service.http_host}:{service.http_port}", f"{service.grpc_host}:{service.grpc_port}", redis
    )
    try:
        serve.start(**serve_ingress(service))
        if service.coordination is not None:  # an app-level policy: Serve takes one only from a Serve config
            _deploy_config(config, ready_timeout_s, node_cores)
        else:
            deploy(build_app(config), service.app_name, ready_timeout_s)
        pools = {"decode": service.decode.replicas_at_start}
        if service.mode == "disaggregated" and service.prefill.present:
            pools["prefill"] = service.prefill.replicas_at_start
        _wait_healthy(running.http_url, pools, ready_timeout_s)
        if "prefill" in pools:
            _check_kv_interchangeable(service.app_name, ready_timeout_s)
        if service.coordination is not None and config.router.api_keys:
            _check_keys_enforced(running.http_url)
    except BaseException:
        running.stop(drain=False)
        raise
    return running


def _check_kv_interchangeable(app_name: str, timeout_s: float) -> None:
    """The compatibility handshake at start: one prefill worker's KV fingerprint against one decode worker's
    (a pool's replicas share its engine config), with what the config cannot say (``dtype: auto`` resolved,
    the checkpoint's digest, vLLM's cache layout). Pools whose KV cannot move between them would recompute
    every prompt: refused, naming both. Each transfer compares them again."""
    from ray import serve

    from kv_transfer.transfer import KVFingerprint

    prints = {}
    for role, deployment in (("prefill", "PrefillWorker"), ("decode", "DecodeWorker")):
        found = serve.get_deployment_handle(deployment, app_name).kv_fingerprint.remote().result(timeout_s=timeout_s)
        prints[role] = KVFingerprint(**{**found, "head_shape": tuple(found["head_shape"])})
    prefill, decode = prints["prefill"], prints["decode"]
    if prefill != decode:
        raise RuntimeError(
            f"the prefill and decode pools' KV is not interchangeable ({'; '.join(prefill.differences(decode))}): "
            f"prefill {prefill}, decode {decode}"
        )


def _quiet_ray_notices() -> None:
    """Ray's two notices that every ``pdserve up`` printed, neither of them news to its user:

    - that a new local cluster has token authentication on by default (README says so) and
      ``RAY_AUTH_MODE=disabled`` opts out: dropped by a filter on the one logger call that says it. (Setting
      ``RAY_AUTH_MODE=token`` here instead, which Ray takes without the notice, left a fresh process's
      local cluster unable to start: Ray had read its config before and made no token, its GCS wanted one.)
    - "Task ServeController... failed. There are infinite retries remaining": ``serve.shutdown()`` ends
      Serve's controller while this driver's calls to it that Ray retries are still open (its
      ``graceful_shutdown`` and long poll). ``RAY_enable_output_error_log_if_still_retry=0``, where the
      environment does not set it, quiets the notice of a retry still to come; a call that finally fails
      still raises."""
    os.environ.setdefault("RAY_enable_output_error_log_if_still_retry", "0")
    auth_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenAuthOnByDefault) for f in auth_setup.filters):
        auth_setup.addFilter(_TokenAuthOnByDefault())


class _TokenAuthOnByDefault(logging.Filter):
    """Drops Ray's notice that token authentication is on by default (Ray 2.60's ``_warn_token_auth_enabled``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "_warn_token_auth_enabled"


def _join_with_token() -> None:
    """Turn token authentication on for joining a cluster when a token is at hand (``RAY_AUTH_TOKEN``,
    ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset: Ray does so only for a cluster it finds by
    itself, never for an explicit address. Ray's own helper (no public API yet)."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def cpus_needed(service: ServiceConfig) -> float:
    """Ray CPUs the app asks for at its largest: every pool at its replica count or autoscaling maximum."""
    pools = [service.router, service.decode] + ([service.prefill] if service.mode == "disaggregated" else [])
    total = 0.0
    for pool in pools:
        total += pool.most_replicas * pool.num_cpus
    return math.ceil(total)


def deploy(app, name: str, timeout_s: float, route_prefix: str | None = "/") -> None:
    """``serve.run`` without its unbounded wait for the app to run (a replica that cannot be placed would
    wait forever), then the wait here, under a deadline. Serve's own non-waiting form (no public API yet)."""
    from ray.serve.api import _run

    _run(app, name=name, route_prefix=route_prefix, _blocking=False)
    _wait_running(name, timeout_s)


def _deploy_config(config: PdserveConfig, timeout_s: float, node_cores: list[int] | None) -> None:
    """Deploy as ``serve run <config.yaml>`` does (Serve's controller builds the app from its import path, over
    ``node_cores`` where given)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from pdserve.app import serve_application, serve_ingress

    schema = ServeDeploySchema(**serve_ingress(config.service), applications=[serve_application(config, node_cores)])
    _get_global_client().deploy_apps(schema)
    _wait_running(config.service.app_name, timeout_s)


def _wait_running(name: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            failed = {d: s.message for d, s in status.deployments.items() if s.status != "HEALTHY"}
            raise RuntimeError(f"the Serve app {name!r} failed to deploy: {status.message} {failed}")
        time.sleep(0.25)
    detail = {d: (s.status, s.message) for d, s in status.deployments.items()} if status else "no status"
    raise TimeoutError(f"the Serve app {name!r} was not running within {timeout_s:g} s: {detail}")


def confined_to(config: PdserveConfig, layouts: dict[str, PoolLayout]) -> list[int]:
    """The cores a local cluster keeps to (the node's reserved ones, from the pools' ``layouts``); none when
    joining a cluster, or where the engines bind every core or were given theirs."""
    return [] if config.ray_address else serving_cores(layouts)


@contextlib.contextmanager
def _serving_processes_on(cores: list[int]):
    """While Ray starts, this thread keeps to ``cores`` and Ray's workers are told this process's niceness:
    every process of the local cluster inherits both (Ray's own default for its workers is nice 15). This
    thread has its cores back afterwards."""
    if not cores:
        yield
        return
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        with _env_while({"RAY_worker_niceness": str(os.getpriority(os.PRIO_PROCESS, 0))}):
            yield
    finally:
        os.sched_setaffinity(0, own)


@contextlib.contextmanager
def _secrets_in_env(config: PdserveConfig | None):
    """The local cluster's processes inherit the secrets as env while Ray starts (a Serve config
    carries none)."""
    secrets_env = {}
    if config is not None and config.cluster_token is not None:
        secrets_env["PDSERVE_CLUSTER_TOKEN"] = config.cluster_token.get_secret_value()
    if config is not None and config.router.api_keys:
        secrets_env["PDSERVE_ROUTER__API_KEYS"] = ",".join(k.get_secret_value() for k in config.router.api_keys)
    with _env_while(secrets_env):
        yield


@contextlib.contextmanager
def _env_while(values: dict[str, str]):
    """``values`` in this process's env for the block; the env as it was afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_keys_enforced(http_url: str) -> None:
    """A Serve config carries no API keys: the router got them from its node's env, or it runs open.
    Open is refused: a request without a key must get 401."""
    try:
        urllib.request.urlopen(f"{http_url}/v1/models", timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            return
        raise
    raise RuntimeError(
        "router.api_keys are set but the router does not ask for them: give PDSERVE_ROUTER__API_KEYS as env "
        "on the cluster's nodes (a Serve config carries no secret)"
    )


def run_until_interrupted(service: Service) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    print("pdserve: shutting down", flush=True)
    service.stop()


def _wait_healthy(http_url: str, pools: dict[str, int], timeout_s: float) -> None:
    """Serve says the app is running once constructors return; workers count once their first heartbeat lands.
    Ready is every pool with the replicas it starts with, so a caller's first requests see the whole pool."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{http_url}/health", timeout=5) as reply:
                live = json.loads(reply.read())["live_workers"]
                if all(live.get(pool, 0) >= want for pool, want in pools.items()):
                    return
                last = f"live workers {live}, waiting for {pools}"
        except OSError as exc:
            last = exc
        time.sleep(0.25)
    raise TimeoutError(f"pdserve did not become healthy at {http_url} within {timeout_s:g} s: {last}")
