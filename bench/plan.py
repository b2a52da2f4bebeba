"""``pdserve plan``: how many prefill and decode replicas a target rate needs, from a few measured figures.

A sizing model, not a simulator of the engine. Its assumptions, stated:

- Prefill: each replica is one server working through prompts one at a time
  at ``prefill_tokens_per_s`` (prompt tokens it computes; cached tokens are
  free). Requests reach the ``P`` replicas evenly and arrive Poisson; a
  replica is an M/M/1 queue, so the p90 wait is ``ln(10 ρ) / (μ (1 - ρ))``
  when ``ρ > 0.1`` (none below). TTFT p90 ≈ that wait + the prompt's own
  prefill + the KV transfer (``kv_bytes_per_token`` × prompt over the link) +
  one decode step + ``overhead_ms`` (the serving path's own cost: front end,
  router, queues; ``pdserve bench overhead`` measures it).
- Prefix hits: the share of prompt tokens cached where the prompt is placed.
  Given as a figure, or estimated with the placement simulator
  (``bench/placement_sim.py``) on a shared-prefix trace for each candidate
  ``P`` (more replicas hold more prefixes, and each receives fewer requests).
- Decode: a replica runs its sequences as one batch; a step costs
  ``decode_step_ms`` plus ``1 / decode_tokens_per_s`` per sequence in the
  batch. By Little's law a replica holds ``λ/D × output × TPOT`` sequences, so
  ``TPOT = step / (1 - λ·output / (D · decode_tokens_per_s))``; and their KV
  (prompt + output tokens each) must fit ``kv_cache_gib``.
- Loads are averages; bursts beyond Poisson need headroom (``utilization_cap``).

The answer is the smallest ``P`` and ``D`` meeting both SLOs at the target rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from bench.placement_sim import SharedPrefixTrace, simulate


@dataclass(frozen=True)
class PlanInput:
    rate_rps: float
    input_tokens: float
    output_tokens: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # per replica at saturation (the batch's tokens per second)
    decode_step_ms: float  # one decode step with a batch of one
    kv_bytes_per_token: int
    link_gb_per_s: float
    kv_cache_gib: float
    ttft_slo_ms: float
    tpot_slo_ms: float
    hit_rate: float | None = 0.0  # None: estimate it with the placement simulator on ``trace``
    trace: SharedPrefixTrace | None = None
    overhead_ms: float = 0.0
    utilization_cap: float = 0.85
    max_replicas: int = 256


@dataclass(frozen=True)
class PoolPlan:
    replicas: int
    utilization: float
    predicted_ms: float  # prefill: TTFT p90; decode: TPOT
    figures: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    prefill: PoolPlan
    decode: PoolPlan
    ratio: str

    def to_dict(self) -> dict:
        return asdict(self)


class PlanError(ValueError):
    """No replica count up to the limit meets the SLO; the message says which bound."""


def plan(spec: PlanInput) -> Plan:
    decode = _decode(spec)
    prefill = _prefill(spec, decode_step_ms=decode.figures["step_ms"])
    divisor = math.gcd(prefill.replicas, decode.replicas)
    return Plan(prefill, decode, f"{prefill.replicas // divisor}:{decode.replicas // divisor}")


def _prefill(spec: PlanInput, decode_step_ms: float) -> PoolPlan:
    transfer_ms = 1000 * spec.input_tokens * spec.kv_bytes_per_token / (spec.link_gb_per_s * 1e9)
    hits: dict[int, float] = {}
    for replicas in range(1, spec.max_replicas + 1):
        hit = spec.hit_rate if spec.hit_rate is not None else hits.setdefault(replicas, _simulated_hit(spec, replicas))
        service_s = spec.input_tokens * (1 - hit) / spec.prefill_tokens_per_s
        rho = spec.rate_rps / replicas * service_s
        if rho >= spec.utilization_cap:
            continue
        wait_ms = 0.0 if rho <= 0.1 else 1000 * math.log(10 * rho) * service_s / (1 - rho)
        ttft_ms = wait_ms + 1000 * service_s + transfer_ms + decode_step_ms + spec.overhead_ms
        if ttft_ms <= spec.ttft_slo_ms:
            figures = {"wait_p90_ms": wait_ms, "prefill_ms": 1000 * service_s, "transfer_ms": transfer_ms,
                       "hit_rate": hit}  # fmt: skip
            return PoolPlan(replicas, rho, ttft_ms, figures)
    raise PlanError(
        f"no prefill pool up to {spec.max_replicas} replicas meets TTFT {spec.ttft_slo_ms} ms: one prompt alone takes "
        f"{1000 * spec.input_tokens / spec.prefill_tokens_per_s + transfer_ms:.0f} ms (prefill + transfer)"
    )


def _decode(spec: PlanInput) -> PoolPlan:
    demand = spec.rate_rps * spec.output_tokens  # tokens per second the pool must produce
    kv_bytes = spec.kv_cache_gib * 2**30
    for replicas in range(1, spec.max_replicas + 1):
        utilization = demand / (replicas * spec.decode_tokens_per_s)
        if utilization >= spec.utilization_cap:
            continue
        tpot_ms = spec.decode_step_ms / (1 - utilization)
        batch = spec.rate_rps / replicas * spec.output_tokens * tpot_ms / 1000
        kv_use = batch * (spec.input_tokens + spec.output_tokens) * spec.kv_bytes_per_token / kv_bytes
        if tpot_ms <= spec.tpot_slo_ms and kv_use <= spec.utilization_cap:
            figures = {"batch": batch, "kv_use": kv_use, "step_ms": spec.decode_step_ms}
            return PoolPlan(replicas, utilization, tpot_ms, figures)
    if spec.decode_step_ms >= spec.tpot_slo_ms:
        raise PlanError(f"TPOT {spec.tpot_slo_ms} ms is below one decode step ({spec.decode_step_ms} ms)")
    raise PlanError(f"no decode pool up to {spec.max_replicas} replicas meets TPOT {spec.tpot_slo_ms} ms")


def _simulated_hit(spec: PlanInput, replicas: int) -> float:
    """``prefix_aware``'s hit rate on ``spec.trace`` over ``replicas`` prefill workers, KV-sized caches."""
    if spec.trace is None:
        raise ValueError("hit_rate None needs a trace to simulate")
    block = 16
    capacity = int(spec.kv_cache_gib * 2**30 / spec.kv_bytes_per_token) // block
    trace = SharedPrefixTrace(**{**asdict(spec.trace), "rate_per_s": spec.rate_rps})
    return simulate(list(trace), "prefix_aware", workers=replicas, capacity_blocks=capacity, block_size=block,
                    tokens_per_s=spec.prefill_tokens_per_s).hit_rate  # fmt: skip
