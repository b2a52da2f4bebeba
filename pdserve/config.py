"""pdserve's one config schema, read from a YAML file, then ``PDSERVE_*`` env, then flags.

Later sources win. Nested fields use ``__`` in env names, e.g.
``PDSERVE_ENGINE__BLOCK_SIZE=32`` sets ``engine.block_size``; flags use
dotted keys (``--set engine.block_size=32``). Every error names the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, model_validator

from engine.config import EngineConfig
from router.config import RouterConfig

ENV_PREFIX = "PDSERVE_"


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every bad field."""


# What makes KV and block hashes interchangeable between the pools, and the context length the router
# checks requests against (a chat without max_tokens runs to its end): one value for the whole service.
_SERVICE_WIDE_ENGINE_FIELDS = {
    "kind", "model", "revision", "download_dir", "model_id", "block_size", "kv_connector", "kv_events_endpoint",
    "max_model_len", "tool_call_parser",
}  # fmt: skip


class PoolAutoscaling(BaseModel):
    """pdserve's autoscaling of a worker pool: Serve's bounds and delays, on the signal that loads the pool.

    The prefill pool scales on prompt tokens queued per replica, the decode pool on running
    sequences and KV pool use per replica (``pdserve/autoscaling.py``)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=1, description="at least one: the router places only on live workers")
    max_replicas: int = Field(default=4, ge=1)
    upscale_delay_s: float = Field(default=10.0, ge=0, description="a need for more replicas this long scales up")
    downscale_delay_s: float = Field(default=60.0, ge=0, description="a need for fewer this long scales down")
    look_back_period_s: float = Field(
        default=10.0, gt=0, description="the window each reported figure is averaged over"
    )
    metrics_interval_s: float = Field(default=2.0, gt=0, description="how often replicas report")
    target_queued_prefill_tokens: float = Field(
        default=4096, gt=0, description="prefill: prompt tokens queued per replica"
    )
    queue_growth_horizon_s: float = Field(
        default=0.0,
        ge=0,
        description="prefill: a queue over its target that still grows counts this many seconds more of its growth "
        "as queued (about the time a new replica takes to serve); 0, the default: only what is queued now",
    )
    target_running_seqs: float = Field(default=32, gt=0, description="decode: running sequences per replica")
    target_kv_used_fraction: float = Field(
        default=0.7, gt=0, le=1,
        description="decode: KV pool wanted per replica (in use, and what its sequences waiting for blocks will take)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _bounds_in_order(self) -> PoolAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self

    def serve_config(self, role: Literal["prefill", "decode"]) -> dict[str, Any]:
        """Serve's ``autoscaling_config`` for the pool of ``role``, its policy pdserve's."""
        if role == "prefill":
            policy = {"policy_function": "pdserve.autoscaling:PrefillPolicy",
                      "policy_kwargs": {"target_queued_prefill_tokens": self.target_queued_prefill_tokens,
                                        "queue_growth_horizon_s": self.queue_growth_horizon_s}}  # fmt: skip
        else:
            policy = {"policy_function": "pdserve.autoscaling:DecodePolicy",
                      "policy_kwargs": {"target_running_seqs": self.target_running_seqs,
                                        "target_kv_used_fraction": self.target_kv_used_fraction}}  # fmt: skip
        bounds = self.model_dump(include={"min_replicas", "max_replicas", "upscale_delay_s", "downscale_delay_s",
                                          "look_back_period_s", "metrics_interval_s"})  # fmt: skip
        return {**bounds, "policy": policy}


ROLE_AUTOSCALING_FIELDS = {
    "prefill": {"target_queued_prefill_tokens", "queue_growth_horizon_s"},
    "decode": {"target_running_seqs", "target_kv_used_fraction"},
}


class PoolCoordination(BaseModel):
    """The two worker pools scaled as one application: each on its own load, their ratio kept in bounds.

    Ray Serve runs an application-level policy only for apps deployed from a Serve config
    (``serve deploy`` / ``serve run`` of a YAML); ``pdserve up`` deploys that way when this is set."""

    model_config = ConfigDict(extra="forbid")

    ratio_slack: float = Field(
        default=2.0,
        ge=1.0,
        description="how far the prefill:decode replica ratio may stray from what the measured prefill and "
        "decode rates and prompt and output lengths ask for before the smaller pool is grown",
    )

    def serve_policy(self) -> dict[str, Any]:
        """The Serve application's ``autoscaling_policy``."""
        return {"policy_function": "pdserve.autoscaling:CoordinatedPolicy",
                "policy_kwargs": {"ratio_slack": self.ratio_slack}}  # fmt: skip


class PoolConfig(BaseModel):
    """One Serve deployment's scaling and resources; ``autoscaling_config`` is Serve's, checked by Serve."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=0, description="fixed replica count (ignored with autoscaling_config)")
    autoscaling_config: dict[str, Any] | None = Field(
        default=None, description="Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests…)"
    )
    num_cpus: float = Field(default=1.0, ge=0, description="Ray CPUs per replica")
    num_gpus: float = Field(default=0.0, ge=0, description="Ray GPUs per replica (1 per engine on GPU clusters)")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources per replica, to keep a pool on some nodes ({'prefill_node': 1})",
    )
    max_ongoing_requests: int = Field(default=64, ge=1, description="requests one replica takes at once")
    cpu_cores: str | None = Field(
        default="auto",
        description="cores each replica's engine binds to ('0-3', '0-1|2-3' for two ranks); auto: cores of its own "
        "on its node, above service.reserved_cores (pdserve/engine_layout.py); none: vLLM's default",
    )
    kv_cache_gib: int | None = Field(default=None, ge=1, description="KV GiB per replica (default: engine's)")
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="engine fields for this pool only, over the top-level engine's (e.g. {tensor_parallel_size: 2}); "
        "the model and block size are the service's",
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a replica Serve stops (scale-down, redeploy) drains this long at most: its streams end or "
        "move (router.recovery.drain_finish_s), peers pull the KV it still offers, then it exits",
    )

    autoscaling: PoolAutoscaling | None = Field(
        default=None,
        description="pdserve's autoscaling on the pool's own load (worker pools; not with autoscaling_config)",
    )

    @model_validator(mode="after")
    def _one_autoscaler(self) -> PoolConfig:
        if self.autoscaling is not None and self.autoscaling_config is not None:
            raise ValueError("autoscaling and autoscaling_config: give one (pdserve's policy, or Serve's default)")
        return self

    @property
    def present(self) -> bool:
        return self.num_replicas > 0 or self.autoscaling_config is not None or self.autoscaling is not None

    @property
    def replicas_at_start(self) -> int:
        """The replicas Serve starts the pool with, at least one: ``pdserve up`` waits for them all to be live,
        and a pool with none would never serve."""
        if self.autoscaling is not None:
            started = self.autoscaling.min_replicas
        elif self.autoscaling_config is not None:
            config = self.autoscaling_config
            started = int(config.get("initial_replicas") or config.get("min_replicas", 1))
        else:
            started = self.num_replicas
        return max(1, started)

    @property
    def most_replicas(self) -> int:
        if self.autoscaling is not None:
            return self.autoscaling.max_replicas
        if self.autoscaling_config is not None:
            return int(self.autoscaling_config.get("max_replicas", 1))
        return self.num_replicas


class TransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[Literal["torch_dist", "grpc"]] = Field(
        default_factory=lambda: ["torch_dist", "grpc"], description="KV channels in order of preference"
    )
    lease_s: float = Field(
        default=30.0, gt=0, description="how long a prefill worker holds KV nobody pulled; the puller renews it"
    )
    stall_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="a pull that makes no progress this long fails: above one prefill step (a chunked prompt's "
        "pull waits a step per chunk; a step whose chunk completes no block, more)",
    )
    pull_timeout_s: float = Field(
        default=600.0, gt=0, description="a whole pull, a long chunked prefill included (a stall fails it sooner)"
    )
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate each prefill worker's KV server presents (TLS for KV)"
    )
    tls_key_file: Path | None = Field(default=None, description="its PEM private key")
    tls_ca_file: Path | None = Field(default=None, description="PEM CA the decode workers check that certificate with")

    @model_validator(mode="after")
    def _tls_is_whole(self) -> TransferConfig:
        """TLS for KV takes all three files, readable now, not at the first transfer."""
        files = {"tls_cert_file": self.tls_cert_file, "tls_key_file": self.tls_key_file,
                 "tls_ca_file": self.tls_ca_file}  # fmt: skip
        given = {name for name, path in files.items() if path is not None}
        if given and given != set(files):
            raise ValueError(f"TLS for KV needs {', '.join(sorted(set(files) - given))} too")
        for name, path in files.items():
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        return self

    def connector_extra(self) -> dict:
        """The connector's own knobs, as its ``kv_connector_extra_config`` (paths as strings)."""
        return {name: str(value) if isinstance(value, Path) else value
                for name, value in self.model_dump().items() if value is not None}  # fmt: skip


class ServiceConfig(BaseModel):
    """The Serve application: mode, addresses, the three pools."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    app_name: str = "pdserve"
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    http_server: Literal["router", "serve_proxy"] = Field(
        default="router",
        description="who serves HTTP on http_host:http_port: each router replica itself, as it serves gRPC "
        "(SO_REUSEPORT; Serve's proxy is left off), or Serve's proxy on every node (one more Ray hop per streamed "
        "token: ~15 % fewer tokens/s here)",
    )
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=9000, ge=1, le=65535)
    heartbeat_s: float = Field(default=1.0, gt=0, description="how often workers report load to the index")
    reserved_cores: int = Field(
        default=1, ge=0,
        description="the lowest cores of each CPU node that no engine binds with cpu_cores: auto (Ray, the Serve "
        "proxy, the router and the replicas' own processes run there, as vLLM's server keeps one for its front end)",
    )  # fmt: skip
    max_inflight: int = Field(default=256, ge=1, description="requests one router replica serves at once (then 429)")
    prefill_timeout_s: float = Field(default=60.0, gt=0, description="a prefill slower than this is redone locally")
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    router: PoolConfig = Field(default_factory=lambda: PoolConfig(num_cpus=0.5, max_ongoing_requests=1024))
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    test_die_on_token: int | None = Field(
        default=None,
        description="fault injection, for tests only: a worker given a prompt that holds this token id kills its "
        "own process at once, as a query of death would",
    )
    coordination: PoolCoordination | None = Field(
        default=None, description="scale the worker pools as one (both need autoscaling): see PoolCoordination"
    )

    @model_validator(mode="after")
    def _router_and_decode_pools_serve(self) -> ServiceConfig:
        """A prefill pool may be left out (num_replicas 0: every prompt is computed on its decode worker); the router
        and decode pools serve every request, so with none the service would never become ready."""
        for role in ("router", "decode"):
            if not getattr(self, role).present:
                raise ValueError(f"service.{role}.num_replicas: 0 leaves no {role} replica to serve requests; give 1 "
                                 f"or more, or autoscaling")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _coordinated_pools_autoscale(self) -> ServiceConfig:
        if self.coordination is not None and (self.prefill.autoscaling is None or self.decode.autoscaling is None):
            raise ValueError("coordination: give service.prefill.autoscaling and service.decode.autoscaling")
        return self

    @model_validator(mode="after")
    def _each_pool_autoscales_on_its_own_signal(self) -> ServiceConfig:
        for role, other in (("prefill", "decode"), ("decode", "prefill")):
            scaling = getattr(self, role).autoscaling
            given = sorted(ROLE_AUTOSCALING_FIELDS[other] & scaling.model_fields_set) if scaling else []
            if given:
                raise ValueError(f"service.{role}.autoscaling.{given[0]}: a {other} pool's setting; the {role} pool "
                                 f"scales on {', '.join(sorted(ROLE_AUTOSCALING_FIELDS[role]))}")  # fmt: skip
        return self


class PdserveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    cluster_token: SecretStr | None = Field(
        default=None, description="shared secret KV peers prove with (PDSERVE_CLUSTER_TOKEN); none: one per app"
    )
    ray_address: str | None = Field(default=None, description="join this Ray cluster; none: start a local one")
    ray_metrics_export_port: int | None = Field(
        default=None, ge=1, le=65535, description="a local cluster's Prometheus port for Ray's metrics (pdserve_*)"
    )
    model_cache_dir: Path = Field(
        default=Path("~/.cache/pdserve/models"),
        description="where each node makes the tiny model when no model is configured; ~ is each node's own home "
        "(expanded there, not where the config is read)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    def pool_engine(self, role: Literal["prefill", "decode"]) -> EngineConfig:
        """The engine a pool runs: the top-level ``engine`` with the pool's ``engine`` fields over it."""
        overrides = getattr(self.service, role).engine
        if not overrides:
            return self.engine
        where = f"service.{role}.engine"
        unknown = sorted(set(overrides) - set(EngineConfig.model_fields))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: not an engine field")
        shared = sorted(set(overrides) & _SERVICE_WIDE_ENGINE_FIELDS)
        if shared:
            raise ValueError(f"{where}.{shared[0]}: the same for every pool (set engine.{shared[0]})")
        try:
            return EngineConfig.model_validate({**self.engine.model_dump(exclude_unset=True), **overrides})
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == "value_error" and not first["loc"]:  # a check across fields: its message names them
                raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
            field = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{where}.{field}: {first['msg']} (got {first.get('input')!r})") from None

    @model_validator(mode="after")
    def _pool_engines_are_valid(self) -> PdserveConfig:
        for role in ("prefill", "decode"):
            engine = self.pool_engine(role)
            cores = getattr(self.service, role).cpu_cores
            if engine.kind == "simulated" and engine.simulated_compute == "sleep" and cores not in (None, "auto"):
                raise ValueError(f"service.{role}.cpu_cores: places a simulated engine's steps only with "
                                 "simulated_compute: cores (sleeping steps take no CPU)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _kv_cache_gib_only_on_cpu(self) -> PdserveConfig:
        """``kv_cache_gib`` is vLLM's CPU KV space (VLLM_CPU_KVCACHE_SPACE): on a GPU vLLM sizes the KV cache from
        the memory fraction it may take, so a value given for a GPU pool would be ignored. Refused instead; the
        default (1) is no value given."""
        for role in ("prefill", "decode"):
            pool = getattr(self.service, role)
            if pool.num_gpus <= 0:
                continue
            if pool.kv_cache_gib is not None:
                field = f"service.{role}.kv_cache_gib"
            elif "kv_cache_gib" in pool.engine:
                field = f"service.{role}.engine.kv_cache_gib"
            elif "kv_cache_gib" in self.engine.model_fields_set:
                field = "engine.kv_cache_gib"
            else:
                continue
            raise ValueError(
                f"{field}: sizes the KV cache on CPU only (VLLM_CPU_KVCACHE_SPACE), and service.{role} runs on GPUs "
                f"(num_gpus {pool.num_gpus:g}): use engine.gpu_memory_utilization instead"
            )
        return self

    @model_validator(mode="after")
    def _router_scales_on_requests(self) -> PdserveConfig:
        router = self.service.router
        if router.autoscaling is not None:
            raise ValueError("service.router.autoscaling: the router pool scales on Serve's autoscaling_config")
        if router.autoscaling_config is not None and self.service.http_server == "router":
            raise ValueError(
                "service.router.autoscaling_config: Serve scales on the requests its proxy and handles carry, and "
                "with service.http_server: router the router replicas take HTTP (and gRPC) themselves, so Serve "
                "would see none: set num_replicas, or http_server: serve_proxy"
            )
        return self

    @model_validator(mode="after")
    def _streams_move_before_the_drain_deadline(self) -> PdserveConfig:
        finish, deadline = self.router.recovery.drain_finish_s, self.service.decode.graceful_shutdown_timeout_s
        if finish + 2 > deadline:
            raise ValueError(
                f"router.recovery.drain_finish_s ({finish:g}) must leave streams 2 s to move before "
                f"service.decode.graceful_shutdown_timeout_s ({deadline:g})"
            )
        return self

    @model_validator(mode="after")
    def _many_routers_share_redis(self) -> PdserveConfig:
        if self.service.router.most_replicas > 1 and not self.router.index.redis_url:
            raise ValueError(
                "service.router: more than one router replica needs router.index.redis_url "
                "(the in-memory index lives in one replica; Redis is the index routers share)"
            )
        return self


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> PdserveConfig:
    """Merge file (or ``data``, e.g. a Serve config's ``args``) < env < overrides (dotted keys); validate once."""
    merged: dict[str, Any] = _read_file(path) if path is not None else dict(data or {})
    for key, value in _env_items(env or {}):
        _set_dotted(merged, key, value)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    _refuse_nested(given)
    for key, value in given.items():
        _set_dotted(merged, key, value)
    return _validated(merged)


def with_settings(config: PdserveConfig, settings: Mapping[str, Any]) -> PdserveConfig:
    """``config`` with dotted ``settings`` applied, validated again. A None value clears its field (a benchmark
    arm turning autoscaling off): unlike ``load_config``'s overrides, where None is a flag left out. Only the
    fields given travel (the rest come back as their defaults): validators that read which fields were given
    (a pool's autoscaling refusing the other pool's settings) see what the user gave, not every default."""
    _refuse_nested(settings)
    merged = config.model_dump(exclude_unset=True)  # python mode: a secret given stays itself, not its mask
    for key, value in settings.items():
        _set_dotted(merged, key, value)
    return _validated(merged)


def _refuse_nested(settings: Mapping[str, Any]) -> None:
    """A setting and one inside it (``a.b`` and ``a.b.c``) are refused together: which wins would depend on
    the order they were given in."""
    nested = sorted(inner for inner in settings for outer in settings if inner.startswith(f"{outer}."))
    if nested:
        raise ConfigError(f"{', '.join(nested)}: set together with a section that holds it")


def _validated(merged: dict[str, Any]) -> PdserveConfig:
    """The config, validated once; errors name the fields."""
    try:
        return PdserveConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``engine.block_size=32`` → (``engine.block_size``, 32): the value read as YAML, unless the field
    takes text and YAML read another scalar (``service.decode.cpu_cores=1`` → ``"1"``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key = key.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    annotation = _field_annotation(key)
    if annotation is None or value is None or isinstance(value, dict | list):
        return key, value
    adapter = TypeAdapter(annotation)
    for candidate in (value, raw):
        try:
            adapter.validate_python(candidate)
        except ValidationError:
            continue
        return key, candidate
    return key, value  # neither fits: validation names the field


def _field_annotation(dotted: str) -> Any:
    """The type of the config field at ``dotted`` (None where the path leaves the schema's models)."""
    model: type[BaseModel] = PdserveConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        field = model.model_fields.get(part)
        nested = [t for t in (field.annotation, *get_args(field.annotation)) if _is_model(t)] if field else []
        if not nested:
            return None
        model = nested[0]
    field = model.model_fields.get(leaf)
    return field.annotation if field is not None else None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def _env_items(env: Mapping[str, str]):
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            yield name[len(ENV_PREFIX) :].lower().replace("__", "."), value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        if error["type"] == "value_error" and not isinstance(error["input"], str | int | float):
            # a check across fields (of the config, or of one section): its message names them
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message}" if where else message)
            continue
        field = ".".join(str(part) for part in error["loc"]) or "config"
        got = (
            f" (got {error['input']!r})" if error["type"] != "missing" and not isinstance(error["input"], dict) else ""
        )
        lines.append(f"{field}: {error['msg']}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)
