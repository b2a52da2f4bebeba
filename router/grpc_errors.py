"""How a request that failed is answered over gRPC: the status its cause calls for, for both gRPC APIs."""

from __future__ import annotations

import logging

import grpc

from router.placement import NoWorkerError
from router.request import RequestError
from router.service import PoisonRequestError, ServiceFullError, WorkerGoneError

log = logging.getLogger(__name__)


def failure_status(exc: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status and details for ``exc``: the caller's fault, the service's capacity, a lost worker, or (logged)
    something that failed mid-request, whose reason the client gets instead of a hang."""
    if isinstance(exc, ServiceFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, NoWorkerError | WorkerGoneError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, PoisonRequestError):
        return grpc.StatusCode.INTERNAL, str(exc)
    if isinstance(exc, RequestError):
        return grpc.StatusCode[exc.grpc_status], str(exc)
    log.warning("request %s failed: %r", request_id, exc)
    return grpc.StatusCode.INTERNAL, f"request {request_id} failed: {exc!r}"[:2000]
