"""Running requests shared between router replicas through Redis: reused ids and aborts reach every router."""

from __future__ import annotations

import threading
import time

from router.request_registry import LocalRegistry, RedisRegistry

NS = "pdserve:test:"


def routers(url: str, ttl_s: float = 5.0) -> tuple[RedisRegistry, RedisRegistry]:
    return RedisRegistry(url, NS, "router-a", ttl_s), RedisRegistry(url, NS, "router-b", ttl_s)


def test_an_id_running_on_one_router_is_refused_by_the_other_until_released(redis_server):
    a, b = routers(redis_server.url)
    assert a.claim("r1")
    assert not b.claim("r1") and not a.claim("r1")
    a.release("r1")
    assert b.claim("r1")


def test_an_abort_asked_of_one_router_reaches_the_router_running_it(redis_server):
    a, b = routers(redis_server.url)
    aborted, arrived = [], threading.Event()
    a.start(lambda request_id: (aborted.append(request_id), arrived.set()))
    try:
        time.sleep(0.2)  # a has subscribed
        assert a.claim("r2")
        assert b.abort_elsewhere("r2")
        assert arrived.wait(5) and aborted == ["r2"]
        assert not b.abort_elsewhere("nobody-runs-this")
    finally:
        a.close()
        b.close()


def test_a_claim_nobody_renews_lapses_and_a_renewed_one_stays(redis_server):
    a, b = routers(redis_server.url, ttl_s=0.4)
    assert a.claim("dead-router") and a.claim("alive")
    time.sleep(0.25)
    a.renew(["alive"])
    time.sleep(0.25)
    assert b.claim("dead-router") and not b.claim("alive")


def test_with_redis_away_requests_are_still_served(redis_server):
    a, _ = routers(redis_server.url)
    redis_server.stop()
    assert a.claim("r3") and not a.abort_elsewhere("r3")
    a.release("r3")


def test_one_router_has_nothing_to_share():
    local = LocalRegistry()
    assert local.claim("r") and local.claim("r") and not local.abort_elsewhere("r")
