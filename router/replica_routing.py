"""Ray Serve request routing for the worker pools: to the replica placement chose, by its id.

Placement is decided once, by the router core, over the prefix index (which
holds every replica's cached blocks under its Serve replica id). This request
router only carries that decision out: a call made with ``worker_id=<replica
id>`` goes to that replica. Serve's own extension point keeps Serve's queueing,
backpressure (``max_ongoing_requests``) and replica lifecycle; direct actor
handles would bypass them. A replica that is gone (scaled down, died) is not
waited for: the call falls back to the other live replicas (Serve picks among them), which is still
correct, only without that replica's cache.

A replica leaving a pool's routing set (Serve is draining it for a
scale-down or a redeploy, or it died) is recorded in ``LeftReplicas``, so the
service stops placing on it at once and moves its streams before Serve's
graceful-shutdown deadline.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Sequence

from ray.serve.context import _get_serve_request_context, _serve_request_context
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from router.left_replicas import LeftReplicas

ROUTER_CLASS = f"{__name__}:PinnedReplicaRouter"


class PinnedReplicaRouter(RequestRouter):
    """No ``FIFOMixin``: it hands the replica chosen for one request to the oldest pending request,
    which is pinned elsewhere; the base router gives each request the replica chosen for it."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's new routing set: a replica missing from it is draining (or dead) from now on."""
        serving = {r.replica_id.unique_id for r in replicas}
        LeftReplicas.record({rid.unique_id for rid in self.curr_replicas} - serving)
        super().update_replicas(replicas)

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


def pinned_call(method, *args, worker_id: str, **kwargs):
    """``method.remote(*args, worker_id=worker_id, **kwargs)``, routed as a request of its own.

    Serve names a handle call after the request it is made in (its internal request id), and
    its request router gives the replica it chose to the pending call of that id. Two calls
    made in one HTTP request and routed at once (a decode stream and an abort, say) would
    share the id, and one could run on the other's replica, or wait forever. With its own
    request context (Serve's context variable; no public API sets it) each call has its own id.
    """
    context = contextvars.copy_context()
    own = dataclasses.replace(_get_serve_request_context(), _internal_request_id="")
    context.run(_serve_request_context.set, own)
    return context.run(method.remote, *args, worker_id=worker_id, **kwargs)
