"""The router replica's own HTTP listener: the OpenAI API served where the request path runs.

Behind Serve's proxy, every streamed token crosses one more Ray hop (router replica → proxy) and the
proxy's event loop: measured here with vLLM's ``bench serve`` on one colocated service, the same load
straight to the router replica gave 200–203 output tokens/s and a TTFT p50 of 102–106 ms, through the
proxy 168–183 tokens/s and 152–370 ms. So, as with gRPC (``router/grpc_api.py``), each router replica
listens itself (uvicorn on a socket bound with SO_REUSEPORT, so replicas on one node share the port),
and Serve's proxy is left off (``service.http_server: router``). ``serve_proxy`` keeps the proxy instead,
on every node, for a load balancer that expects HTTP on each node of the cluster. Either way the app is the
Router's Serve ingress app, whose handlers get the replica as ``self`` from Serve's replica context.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

_READY_TIMEOUT_S = 120.0  # how long the listener waits for its replica to be ready before it gives up


class _ReplicaServer(uvicorn.Server):
    """uvicorn without its signal handlers: the replica's process owns SIGINT and SIGTERM."""

    def capture_signals(self):
        return contextlib.nullcontext()


class HttpListener:
    """A uvicorn server on this event loop, over a socket other replicas on the node may bind too. It binds at
    once (a port taken fails the start) and accepts once ``ready()`` (connections wait in the backlog)."""

    def __init__(self, app: FastAPI, sock: socket.socket, address: str, grace_s: float, ready: Callable[[], bool]):
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(1, int(grace_s)))  # fmt: skip
        self._server, self._sock, self._grace_s, self.address = _ReplicaServer(config), sock, grace_s, address
        self._task = asyncio.get_running_loop().create_task(self._serve_when(ready))

    def failure(self) -> str | None:
        """Why it no longer serves (None while it does, waits to, or was stopped): for the health check."""
        if not self._task.done() or self._server.should_exit:
            return None
        if self._task.cancelled():
            return f"HTTP on {self.address} was cancelled"
        return f"HTTP on {self.address} stopped: {self._task.exception()!r}"

    async def stop(self) -> None:
        """Stop accepting; open responses get the grace period to finish, then are cancelled."""
        self._server.should_exit = True
        if not self._server.started:  # still waiting for the replica: nothing to drain
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._sock.close()
            return
        await asyncio.wait_for(asyncio.gather(self._task, return_exceptions=True), self._grace_s + 5.0)

    async def _serve_when(self, ready: Callable[[], bool]) -> None:
        deadline = asyncio.get_running_loop().time() + _READY_TIMEOUT_S
        while not ready():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the replica was not ready within {_READY_TIMEOUT_S:g} s")
            await asyncio.sleep(0.01)
        await self._server.serve(sockets=[self._sock])


def start_http_listener(app: FastAPI, host: str, port: int, grace_s: float, ready: Callable[[], bool]) -> HttpListener:
    """Bind ``host:port`` (SO_REUSEPORT) and serve ``app`` there once ``ready()``; call on the serving loop."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]  # fmt: skip
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(
            f"HTTP cannot listen on {host}:{port}: {exc} (with service.http_server: router, Serve's own proxy "
            "must not take that port: proxy_location: Disabled in a Serve config)"
        ) from exc
    return HttpListener(app, sock, f"{host}:{port}", grace_s, ready)
