"""Ray Serve request routing for the worker pools: to the replica placement chose, by its id.

Placement is decided once, by the router core, over the prefix index (which
holds every replica's cached blocks under its Serve replica id). This request
router only carries that decision out: a call made with ``worker_id=<replica
id>`` goes to that replica. Serve's own extension point keeps Serve's queueing,
backpressure (``max_ongoing_requests``) and replica lifecycle; direct actor
handles would bypass them. A replica that is gone (scaled down, died) is not
waited for: the call falls back to the other live replicas (Serve picks among them), which is still
correct, only without that replica's cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

ROUTER_CLASS = f"{__name__}:PinnedReplicaRouter"


class PinnedReplicaRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> Sequence[list[RunningReplica]]:
        wanted = (pending_request.kwargs or {}).get("worker_id") if pending_request else None
        if wanted is not None:
            pending_request.routing_context.should_backoff = True
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == wanted]
            if pinned:
                return [pinned]
        return [sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)]
