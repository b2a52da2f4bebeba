"""The router replica's own HTTP listener: replicas on one node share the port, a connection made before the
replica is ready waits for it, and a port taken is a clear error."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest
from fastapi import FastAPI

from pdserve.local_redis import free_port
from router.http_server import start_http_listener


def app_answering(name: str) -> FastAPI:
    app = FastAPI()

    @app.get("/who")
    async def who():
        return {"listener": name}

    return app


def get(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/who", timeout=5) as reply:
        return json.loads(reply.read())


def always() -> bool:
    return True


def test_two_listeners_share_one_port_and_a_stopped_one_leaves_the_other_serving():
    async def scenario():
        port = free_port()
        first = start_http_listener(app_answering("first"), "127.0.0.1", port, 1.0, always)
        second = start_http_listener(app_answering("second"), "127.0.0.1", port, 1.0, always)
        seen = {(await asyncio.to_thread(get, port))["listener"] for _ in range(40)}
        await first.stop()
        after = {(await asyncio.to_thread(get, port))["listener"] for _ in range(10)}
        await second.stop()
        return seen, after

    seen, after = asyncio.run(scenario())
    assert seen == {"first", "second"}  # the kernel spreads new connections over both
    assert after == {"second"}


def test_a_request_made_before_the_replica_is_ready_is_answered_once_it_is():
    async def scenario():
        port, ready = free_port(), asyncio.Event()
        listener = start_http_listener(app_answering("late"), "127.0.0.1", port, 1.0, ready.is_set)
        request = asyncio.create_task(asyncio.to_thread(get, port))
        await asyncio.sleep(0.5)
        waited = not request.done() and listener.failure() is None
        ready.set()
        answer = await asyncio.wait_for(request, 10)
        await listener.stop()
        return waited, answer

    waited, answer = asyncio.run(scenario())
    assert waited and answer == {"listener": "late"}


def test_a_port_another_server_holds_is_refused_naming_the_port_and_serves_proxy():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]

    async def start():
        start_http_listener(app_answering("x"), "127.0.0.1", port, 1.0, always)

    try:
        with pytest.raises(OSError, match=rf"HTTP cannot listen on 127.0.0.1:{port}.*proxy_location: Disabled"):
            asyncio.run(start())
    finally:
        holder.close()


def test_a_listener_that_stopped_on_its_own_reports_why_for_the_health_check():
    def never_ready() -> bool:
        raise RuntimeError("replica context gone")

    async def scenario():
        listener = start_http_listener(app_answering("x"), "127.0.0.1", free_port(), 1.0, never_ready)
        await asyncio.sleep(0.2)
        why = listener.failure()
        await listener.stop()
        return why, listener.failure()

    why, after_stop = asyncio.run(scenario())
    assert why is not None and "replica context gone" in why
    assert after_stop is None  # a stop asked for is not a failure
