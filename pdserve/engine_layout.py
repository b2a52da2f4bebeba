"""Each pool's engine, checked before any replica starts, and the cores its replicas bind on CPU nodes.

``pdserve up`` (and ``serve deploy`` through ``app_builder``) refuses an engine
that cannot run: a tensor-parallel size that does not divide the model's heads,
or that asks for more devices than a node has. The message names the field.

Cores (CPU pools with ``cpu_cores: auto``): the node's lowest ``reserved_cores``
stay with the serving processes; the rest are shared out, so that every rank of
every replica planned (initial replicas × tensor-parallel size) binds cores no
other engine binds (engine/core_ledger.py). Where a node has fewer engine cores
than ranks, no core is reserved and the ranks split the node's cores: on a
2-core node, disaggregated, prefill on one core and decode on the other, as
pdserve ran before, rather than two spinning engines on one core (README,
"Cores on CPU nodes"). The serving processes then share the prefill pool's
cores (its ranks keep the replica's niceness) while the decode ranks run ahead
of them, as every rank does beside a reserved core: a token waits for a decode
step, a prompt for a prefill, and the serving processes' work between tokens no
longer lands in the middle of the decode steps. Without a prefill pool (co-located)
they share the decode ranks' cores. Where even that cannot give each rank a core (a
two-rank prefill engine beside a decode engine on two cores), each engine still
asks for a core per rank: the first claims free ones, the next binds one rank
per core of the node, shared, and says so at start (vLLM's own binding cannot
place two ranks on one NUMA node); there no rank runs ahead of another.

Where cores are reserved, the serving processes keep to them (``serving_cores``;
``pdserve up`` confines the local cluster there), as vLLM's server keeps its
front end and engine core off the core its worker binds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from engine.config import EngineConfig
from engine.core_ledger import CoreRequest
from pdserve.config import ConfigError, PdserveConfig, PoolConfig
from pdserve.models import model_config

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class PoolLayout:
    role: Role
    engine: EngineConfig
    cores: CoreRequest | None  # None: explicit cores (engine.cpu_cores), a GPU pool, a sleeping simulated engine,
    # or vLLM's default
    shares_serving_cores: bool = False  # the serving processes run on its cores: its ranks keep their niceness

    def describe(self) -> str:
        tp = self.engine.tensor_parallel_size
        if self.engine.cpu_cores is not None:
            where = f"cores {self.engine.cpu_cores} (as configured)"
        elif self.engine.kind == "simulated" and self.engine.simulated_compute == "sleep":
            where = "simulated, its steps asleep on no core"
        elif self.cores is None:
            where = "vLLM's default binding"
        else:
            above = f"above core {self.cores.reserved - 1}" if self.cores.reserved else "no core reserved"
            where = f"{self.cores.per_rank} core(s) per rank of its own, {above}"
            if self.shares_serving_cores:
                where += ", shared with the serving processes"
        return f"{self.role}: TP={tp}, {where}"


def plan(
    config: PdserveConfig,
    roles: list[Role],
    gpus_per_node: float = 0.0,
    hf: dict | None = None,
    node_cores: list[int] | None = None,
) -> dict[Role, PoolLayout]:
    """Every pool's engine and cores; ``ConfigError`` for an engine that cannot run. The checks read the model's
    ``config.json``: ``hf`` where the caller has read it already, else from this node (made present here first:
    ``EngineConfigError`` where it cannot be had). Cores: the node's ``node_cores``, else this process's."""
    pools = {role: getattr(config.service, role) for role in roles}
    engines = {role: _with_pool_cores(config.pool_engine(role), pools[role]) for role in roles}
    cores = tuple(sorted(node_cores if node_cores is not None else os.sched_getaffinity(0)))
    count = len(cores)
    hf = hf if hf is not None else model_config(config)
    for role in roles:
        _check_engine(engines[role], _field(config, role), pools[role], count, gpus_per_node, hf)
    if {"prefill", "decode"} <= set(roles):
        _check_kv_interchangeable(config, engines["prefill"], engines["decode"], hf)
    auto = [r for r in roles if _binds_auto(pools[r], engines[r])]
    ranks = sum(_initial_replicas(pools[r]) * engines[r].tensor_parallel_size for r in auto)
    reserved = config.service.reserved_cores
    if ranks and count - reserved >= ranks:
        request = {"per_rank": (count - reserved) // ranks, "node_cores": cores, "reserved": reserved}
    elif ranks:  # too few to keep one back: split the node, reserve none; fewer cores than ranks: share some
        request = {"per_rank": max(1, count // ranks), "node_cores": cores, "reserved": 0}
    else:
        request = None
    if not request or request["reserved"]:
        shared = []  # every rank beside the serving processes' core, ahead of them
    elif ranks > count:
        shared = auto  # ranks share cores with each other too: one ahead would starve the other's
    else:
        shared = ["prefill" if "prefill" in auto else "decode"]
    return {
        role: PoolLayout(
            role,
            engines[role],
            CoreRequest(ranks=engines[role].tensor_parallel_size, **request) if role in auto and request else None,
            role in shared,
        )
        for role in roles
    }


def serving_cores(layouts: dict[Role, PoolLayout]) -> list[int]:
    """The cores the serving processes keep to: the node's reserved ones, where the engines leave them free;
    none (free to run anywhere) where engines bind every core or their cores were given."""
    for pool in layouts.values():
        if pool.cores is not None and pool.cores.reserved:
            return sorted(pool.cores.node_cores)[: pool.cores.reserved]
    return []


def _with_pool_cores(engine: EngineConfig, pool: PoolConfig) -> EngineConfig:
    """A pool's own ``cpu_cores``, as given, over its engine's."""
    if pool.cpu_cores in (None, "auto"):
        return engine
    return engine.model_copy(update={"cpu_cores": pool.cpu_cores})


def _binds_auto(pool: PoolConfig, engine: EngineConfig) -> bool:
    """Whether the pool's engines take cores of the node from the plan: not on GPUs, not where given, and not a
    simulated engine whose steps sleep (it takes no CPU: 32 of them share two cores with the serving processes)."""
    sleeps = engine.kind == "simulated" and engine.simulated_compute == "sleep"
    return pool.cpu_cores == "auto" and engine.cpu_cores is None and pool.num_gpus == 0 and not sleeps


def _initial_replicas(pool: PoolConfig) -> int:
    if pool.autoscaling is not None:
        return pool.autoscaling.min_replicas
    if pool.autoscaling_config is not None:
        return int(pool.autoscaling_config.get("min_replicas", pool.autoscaling_config.get("initial_replicas", 1)))
    return pool.num_replicas


def _field(config: PdserveConfig, role: Role) -> str:
    overrides = getattr(config.service, role).engine
    return f"service.{role}.engine" if "tensor_parallel_size" in overrides else "engine"


def _check_kv_interchangeable(config: PdserveConfig, prefill: EngineConfig, decode: EngineConfig, hf: dict) -> None:
    """The pools' KV must be interchangeable (the model, block size and hashing are one for the service).

    Tensor-parallel sizes may differ: each decode rank pulls the KV heads it holds from the prefill ranks
    that hold them. Not for a model whose KV is not split by head (MLA's latent KV), and not between
    element types. A ``dtype: auto`` is compared again, resolved, by each transfer's fingerprint."""
    for name in ("dtype", "kv_cache_dtype"):
        ours, theirs = getattr(prefill, name), getattr(decode, name)
        if ours != theirs and "auto" not in (ours, theirs):
            raise ConfigError(
                f"{_where(config, 'prefill', name)}.{name} {ours!r} != {_where(config, 'decode', name)}.{name} "
                f"{theirs!r}: KV moved between the pools must have one element type"
            )
    if hf.get("kv_lora_rank") and prefill.tensor_parallel_size != decode.tensor_parallel_size:
        raise ConfigError(
            f"{_field(config, 'prefill')}.tensor_parallel_size {prefill.tensor_parallel_size} != "
            f"{_field(config, 'decode')}.tensor_parallel_size {decode.tensor_parallel_size}: this model's KV "
            "(multi-head latent attention) is not split by head; the pools must run one tensor-parallel size"
        )


def _where(config: PdserveConfig, role: Role, name: str) -> str:
    return f"service.{role}.engine" if name in getattr(config.service, role).engine else "engine"


def _check_engine(engine: EngineConfig, where: str, pool: PoolConfig, node_cores: int, gpus: float, hf: dict) -> None:
    tp = engine.tensor_parallel_size
    field = f"{where}.tensor_parallel_size"
    heads = hf.get("num_attention_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads and heads % tp:
        raise ConfigError(f"{field}: {tp} does not divide the model's {heads} attention heads")
    if kv_heads and kv_heads % tp and tp % kv_heads:
        raise ConfigError(f"{field}: {tp} and the model's {kv_heads} KV heads: neither divides the other")
    if pool.num_gpus > 0:
        if gpus and tp * pool.num_gpus > gpus:
            raise ConfigError(f"{field}: {tp} ranks × {pool.num_gpus:g} GPU need more GPUs than a node has ({gpus:g})")
    elif tp > node_cores:
        raise ConfigError(f"{field}: {tp} ranks need a core each; this node has {node_cores}")
