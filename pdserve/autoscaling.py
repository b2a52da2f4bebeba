"""Serve autoscaling on the signals that load each pool, through Serve's custom-policy hook.

Serve's default policy counts ongoing requests per replica, which is the wrong
signal for both roles: a prefill replica is loaded by the prompt tokens it has
queued, a decode replica by its running sequences and its KV pool. Each worker
replica reports these (``record_autoscaling_stats``, what its heartbeat
reports too); Serve averages each over ``look_back_period_s`` per replica and
calls the pool's policy, which returns the replica count that brings the load
per replica to its target. The load a policy reads is the larger of that average and the replicas'
latest readings: a burst of long prompts asks for its replicas as the queue builds, not a look-back
window later, while going down still waits for the whole window, and Serve's ``upscale_delay_s``
still keeps a spike shorter than it from scaling. Serve then applies ``min_replicas`` /
``max_replicas``, the up and down delays and the scaling factors, as it does
for its own policy. The controller imports this module by path: it stays free
of torch, vLLM and Ray imports (the figures' names come from the torch-free
``engine/autoscaling_stats.py``).
"""

from __future__ import annotations

import math
from typing import Any

from engine.autoscaling_stats import (
    DECODE_TOKENS_PER_SEQ_S,
    HELD_PREFILL_TOKENS,
    KV_POOL_TOKENS,
    KV_WANTED_FRACTION,
    OUTPUT_TOKENS_MEAN,
    PREFILL_TOKENS_PER_S,
    PROMPT_TOKENS_MEAN,
    QUEUED_PREFILL_TOKENS,
    RUNNING_SEQS,
)


def _growth(ctx: Any, metric: str) -> float:
    """How fast one reported figure grows, per second, summed over replicas: each replica's least-squares
    slope over its readings (none for a replica with fewer than two). Serve hands a policy each replica's
    readings of the look-back window only: the replica drops older ones before it reports (Ray 2.60,
    ``serve/_private/replica.py``)."""
    series = (ctx.raw_metrics or {}).get(metric, {}).values()
    return sum(_slope([(point.timestamp, point.value) for point in points]) for points in series)


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0


def _total(ctx: Any, metric: str) -> float:
    """The sum over replicas of one reported figure (each averaged over the look-back window)."""
    return sum((ctx.aggregated_metrics or {}).get(metric, {}).values())


def _load(ctx: Any, metric: str) -> float:
    """The sum over replicas of one reported figure: the look-back window's average, or the latest readings
    where they are higher (a load that is growing)."""
    series = (ctx.raw_metrics or {}).get(metric, {}).values()
    latest = sum(max(points, key=lambda point: point.timestamp).value for points in series if points)
    return max(_total(ctx, metric), latest)


class PrefillPolicy:
    """Replicas for the prompt tokens queued: ``ceil(queued / target_queued_prefill_tokens)``, counting those the
    routers hold for the pool (``held_tokens``, growing at ``held_growth`` a second) where the caller sees them
    (``CoordinatedPolicy``).

    A queue over the pool's target that is still growing counts as queued what it will have grown by
    ``queue_growth_horizon_s`` later (its slope over the look-back window): replicas asked for now serve only
    once they have started, and a pool that asks for what its queue is today asks again, one start later, for
    what arrived meanwhile (on the simulated step trace, ``pdserve bench autoscale --engine simulated``, the
    prompts arriving while the prefill replicas started were the misses). Off unless given: on that trace it
    asked for the pool's replicas in one decision rather than two, but the replicas' start on two cores, not the
    ask, set when they served, and the benchmark's key did not move beyond its spread."""

    def __init__(self, target_queued_prefill_tokens: float, queue_growth_horizon_s: float = 0.0):
        self.target = target_queued_prefill_tokens
        self.horizon_s = queue_growth_horizon_s

    def __call__(self, ctx: Any, held_tokens: float = 0.0, held_growth: float = 0.0) -> tuple[int, dict]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        queued = _load(ctx, QUEUED_PREFILL_TOKENS) + held_tokens
        growth = _growth(ctx, QUEUED_PREFILL_TOKENS) + held_growth
        if growth > 0 and queued > self.target * ctx.current_num_replicas:
            queued += growth * self.horizon_s
        return math.ceil(queued / self.target), {}


class DecodePolicy:
    """Replicas for the sequences to serve and for the KV pool they want, whichever asks for more.

    Sequences waiting for a prefill worker's KV are left out of the first (until it lands, they wait on the
    prefill pool) and stay in the second (their blocks are held from admission, in vLLM as here). The KV wanted
    counts the blocks in use and those the sequences waiting for blocks will take (``EngineStats.
    kv_wanted_fraction``): the blocks in use alone stop at the pool's size, so a pool too small for its
    sequences asked for no more than ``1 / target_kv_used_fraction`` replicas each, whatever waited (on the
    simulated step trace, one decode replica holding two of the burst's 2,080-token sequences with more waiting
    asked for two replicas, then the pool grew one start at a time while the requests of the burst's first 30 s
    missed their TTFT, most of it spent on the decode worker)."""

    def __init__(self, target_running_seqs: float, target_kv_used_fraction: float):
        self.target_seqs = target_running_seqs
        self.target_kv = target_kv_used_fraction

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        by_seqs = _load(ctx, RUNNING_SEQS) / self.target_seqs
        by_kv = _load(ctx, KV_WANTED_FRACTION) / self.target_kv
        return math.ceil(max(by_seqs, by_kv)), {}


class CoordinatedPolicy:
    """The application-level policy: each pool's own policy, then the prefill:decode ratio kept in bounds.

    A request costs the prefill pool ``prompt / R_p`` replica-seconds and the decode pool
    ``output / R_d``, where ``R`` is what one replica of the pool sustains and the lengths are the means
    the replicas see over the last ~10 s (uncached prompt tokens; output tokens, counted as they stream:
    ``engine/throughput.py``). ``R_p`` is the prompt tokens a prefill replica computes per busy second;
    ``R_d`` the tokens per second of one decoding sequence (1 / TPOT, measured by the replicas) times the
    decode pool's ``target_running_seqs``: a decode replica's throughput grows with its batch, and its
    tokens per busy second at the batch a light load gives say little of what it sustains at its target
    (on the simulated step trace, one stream at a time before the burst of long prompts: the ratio asked
    for 8 decode replicas where the decode pool's own signals asked for 2). So the pools should
    stand in the ratio ``(prompt / R_p) : (output / R_d)``. When the
    replica counts fall outside ``[ideal / ratio_slack, ideal * ratio_slack]``, the smaller side is
    raised, never the larger lowered, and only once the larger has grown past its minimum (the ratio
    guards growth; at low load the rates, measured on small batches, say little): a burst of long
    prompts grows the prefill pool, a burst of long generations the decode pool, and growing one
    never starves the other. Until both pools have measured their rates, each pool's own policy
    alone decides. The prompts the routers hold for the prefill pool (``router/prefill_queue.py``;
    reported by the Router deployment) count as queued on it, and the decode pool is asked for the KV those
    prompts and the ones queued there will take (``_make_room_for_the_prefill_backlog``). Any other deployment
    (the router) scales on ongoing requests, as Serve's default policy does. Serve's wrapper applies each pool's
    bounds and delays, and starts a pool at zero.
    """

    def __init__(self, ratio_slack: float = 2.0):
        self.slack = ratio_slack

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, float], dict]:
        decisions: dict[Any, float] = {}
        pools: dict[str, Any] = {}
        held = sum(_load(ctx, HELD_PREFILL_TOKENS) for ctx in contexts.values())
        held_growth = sum(_growth(ctx, HELD_PREFILL_TOKENS) for ctx in contexts.values())
        for deployment, ctx in contexts.items():
            role, own = _pool_policy(ctx.config)
            if role is not None:
                pools[role] = deployment
            if role == "prefill":
                decisions[deployment] = own(ctx, held, held_growth)[0]
            elif own is not None:
                decisions[deployment] = own(ctx)[0]
            else:
                decisions[deployment] = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        if "prefill" in pools and "decode" in pools:
            self._make_room_for_the_prefill_backlog(decisions, contexts, pools["prefill"], pools["decode"], held)
            self._keep_ratio(decisions, contexts, pools["prefill"], pools["decode"])
        return decisions, {}

    def ideal_ratio(self, prefill: Any, decode: Any, seqs_per_decode_replica: float) -> float | None:
        """Prefill replicas per decode replica that the measured work asks for; None until measured."""
        figures = (_mean(prefill, PROMPT_TOKENS_MEAN), _mean(prefill, PREFILL_TOKENS_PER_S),
                   _mean(decode, OUTPUT_TOKENS_MEAN), _mean(decode, DECODE_TOKENS_PER_SEQ_S))  # fmt: skip
        if any(not figure for figure in figures):
            return None
        prompt, prefill_rate, output, sequence_rate = figures
        return (prompt / prefill_rate) / (output / (sequence_rate * seqs_per_decode_replica))

    def _make_room_for_the_prefill_backlog(
        self, decisions: dict, contexts: dict, prefill_id: Any, decode_id: Any, held: float
    ) -> None:
        """The decode pool is asked for the KV its own sequences want and the KV the prompts queued on the prefill
        pool or held for it by the routers will take once prefilled (their uncached tokens: a prefix the decode
        worker holds takes no new blocks there), at its ``target_kv_used_fraction``. The decode replicas see a
        prompt only once its prefill starts, so a burst of long prompts read on the decode pool alone grew it
        one start at a time behind the prefill pool (on the simulated step trace, the prefill pool at 4 by 52 s,
        the decode pool, KV-bound at two of the burst's sequences a replica, at 8 only by 61 s)."""
        decode = contexts[decode_id]
        pool_tokens = _mean(decode, KV_POOL_TOKENS)
        if not pool_tokens:
            return
        coming = _load(contexts[prefill_id], QUEUED_PREFILL_TOKENS) + held
        wanted = _load(decode, KV_WANTED_FRACTION) + coming / pool_tokens
        decisions[decode_id] = max(decisions[decode_id], math.ceil(wanted / _pool_policy(decode.config)[1].target_kv))

    def _keep_ratio(self, decisions: dict, contexts: dict, prefill_id: Any, decode_id: Any) -> None:
        prefill, decode = contexts[prefill_id], contexts[decode_id]
        ideal = self.ideal_ratio(prefill, decode, _pool_policy(decode.config)[1].target_seqs)
        if ideal is None:
            return
        p = _bounded(prefill, decisions[prefill_id])
        d = _bounded(decode, decisions[decode_id])
        if p / d < ideal / self.slack and d > decode.capacity_adjusted_min_replicas:
            decisions[prefill_id] = max(decisions[prefill_id], math.ceil(d * ideal / self.slack))
        elif p / d > ideal * self.slack and p > prefill.capacity_adjusted_min_replicas:
            decisions[decode_id] = max(decisions[decode_id], math.ceil(p / (ideal * self.slack)))


def _pool_policy(config: Any) -> tuple[str | None, Any]:
    """The pool (prefill / decode) a deployment is and its own pdserve policy, from its autoscaling config."""
    policy = getattr(config, "policy", None)
    function = getattr(policy, "policy_function", "")
    name = function.rpartition(":")[2] if isinstance(function, str) else getattr(function, "__name__", "")
    kwargs = getattr(policy, "policy_kwargs", None) or {}
    if name == PrefillPolicy.__name__:
        return "prefill", PrefillPolicy(**kwargs)
    if name == DecodePolicy.__name__:
        return "decode", DecodePolicy(**kwargs)
    return None, None


def _mean(ctx: Any, metric: str) -> float | None:
    """The mean over replicas of one reported figure; None when no replica reports it yet."""
    values = list((ctx.aggregated_metrics or {}).get(metric, {}).values())
    return sum(values) / len(values) if values else None


def _bounded(ctx: Any, replicas: float) -> int:
    """The replica count Serve will apply: within the pool's min and max, at least one."""
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    return max(1, min(max(math.ceil(replicas), low), high))
