"""Serve autoscaling on the signals that load each pool, through Serve's custom-policy hook.

Serve's default policy counts ongoing requests per replica, which is the wrong
signal for both roles: a prefill replica is loaded by the prompt tokens it has
queued, a decode replica by its running sequences and its KV pool. Each worker
replica reports these (``record_autoscaling_stats``, what its heartbeat
reports too); Serve averages each over ``look_back_period_s`` per replica and
calls the pool's policy, which returns the replica count that brings the load
per replica to its target. Serve then applies ``min_replicas`` /
``max_replicas``, the up and down delays and the scaling factors, as it does
for its own policy. The controller imports this module by path: it stays free
of torch, vLLM and Ray imports.
"""

from __future__ import annotations

import math
from typing import Any

# The figures a worker replica reports to Serve's autoscaler (``HostedWorker.record_autoscaling_stats``).
QUEUED_PREFILL_TOKENS = "queued_prefill_tokens"
RUNNING_SEQS = "running_seqs"
KV_USED_FRACTION = "kv_used_fraction"


def _total(ctx: Any, metric: str) -> float:
    """The sum over replicas of one reported figure (each averaged over the look-back window)."""
    return sum((ctx.aggregated_metrics or {}).get(metric, {}).values())


class PrefillPolicy:
    """Replicas for the prompt tokens queued: ``ceil(queued / target_queued_prefill_tokens)``."""

    def __init__(self, target_queued_prefill_tokens: float):
        self.target = target_queued_prefill_tokens

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        return math.ceil(_total(ctx, QUEUED_PREFILL_TOKENS) / self.target), {}


class DecodePolicy:
    """Replicas for the running sequences and for the KV pool in use, whichever asks for more."""

    def __init__(self, target_running_seqs: float, target_kv_used_fraction: float):
        self.target_seqs = target_running_seqs
        self.target_kv = target_kv_used_fraction

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        by_seqs = _total(ctx, RUNNING_SEQS) / self.target_seqs
        by_kv = _total(ctx, KV_USED_FRACTION) / self.target_kv
        return math.ceil(max(by_seqs, by_kv)), {}
