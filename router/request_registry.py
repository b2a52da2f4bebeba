"""Which router replica runs which request, so an abort or a reused id reaches every replica.

With one router (the in-memory index) there is nothing to share: ``LocalRegistry``.
With Redis, ``RedisRegistry``: each running request holds ``{ns}req:{id}`` →
its router's id (set only if absent, with a TTL the router renews while the
request runs), so a second request with a running id is refused by whichever
router gets it; a router asked to abort an id it does not run publishes the id
on ``{ns}abort``, and the router that runs it, which listens there, aborts it.
If Redis is away, ids are checked per router only and aborts reach only local
requests; requests are still served.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import redis

from router.config import IndexConfig

log = logging.getLogger(__name__)

_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)


class RequestRegistry(Protocol):
    network_io: bool  # True: calls go to a server, so an event loop runs them in a thread

    def start(self, on_abort: Callable[[str], None]) -> None:
        """Begin taking aborts from other routers; ``on_abort`` is called from a background thread."""

    def claim(self, request_id: str) -> bool:
        """Record this router as running ``request_id``; False when another router already runs it."""

    def renew(self, request_ids: Sequence[str]) -> None: ...

    def release(self, request_id: str) -> None: ...

    def abort_elsewhere(self, request_id: str) -> bool:
        """Ask the router running ``request_id`` to abort it; False when no router runs it."""

    def close(self) -> None: ...


class LocalRegistry:
    network_io = False

    def start(self, on_abort: Callable[[str], None]) -> None:
        pass

    def claim(self, request_id: str) -> bool:
        return True

    def renew(self, request_ids: Sequence[str]) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass

    def abort_elsewhere(self, request_id: str) -> bool:
        return False

    def close(self) -> None:
        pass


class RedisRegistry:
    network_io = True

    def __init__(self, url: str, namespace: str, router_id: str, ttl_s: float, timeout_s: float = 0.5):
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._ns = namespace
        self._router_id = router_id
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None

    def start(self, on_abort: Callable[[str], None]) -> None:
        self._listener = threading.Thread(target=self._listen, args=(on_abort,), name="pdserve-aborts", daemon=True)
        self._listener.start()

    def claim(self, request_id: str) -> bool:
        try:
            return bool(self._client.set(self._key(request_id), self._router_id, nx=True, px=self._ttl_ms))
        except _UNREACHABLE as exc:
            log.info("request registry unreachable, %s checked on this router only: %s", request_id, exc)
            return True

    def renew(self, request_ids: Sequence[str]) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            for request_id in request_ids:
                pipe.pexpire(self._key(request_id), self._ttl_ms)
            pipe.execute()
        except _UNREACHABLE as exc:
            log.info("renewing %d running requests failed: %s", len(request_ids), exc)

    def release(self, request_id: str) -> None:
        try:
            self._client.delete(self._key(request_id))
        except _UNREACHABLE as exc:  # the TTL frees it
            log.info("releasing %s failed: %s", request_id, exc)

    def abort_elsewhere(self, request_id: str) -> bool:
        try:
            owner = self._client.get(self._key(request_id))
            if owner is None:
                return False
            self._client.publish(self._ns + "abort", request_id)
            return True
        except _UNREACHABLE as exc:
            log.warning("abort of %s could not reach the other routers: %s", request_id, exc)
            return False

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(5.0)
        self._client.close()

    def _key(self, request_id: str) -> str:
        return f"{self._ns}req:{request_id}"

    def _listen(self, on_abort: Callable[[str], None]) -> None:
        """Aborts published by other routers, until closed; resubscribes after a Redis outage."""
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._ns + "abort")
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        on_abort(message["data"].decode())
            except _UNREACHABLE as exc:
                log.info("abort channel unreachable, retrying: %s", exc)
                self._stop.wait(1.0)
            finally:
                pubsub.close()


def make_registry(index: IndexConfig, model_id: str, router_id: str) -> RequestRegistry:
    """Shared through the index's Redis when there is one (many routers), else local (one router)."""
    url = index.connection_url()
    if url is None:
        return LocalRegistry()
    return RedisRegistry(url, f"pdserve:{model_id}:", router_id, index.in_flight_ttl_s, index.timeout_s)
