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

import uvicorn
from fastapi import FastAPI

_START_TIMEOUT_S = 30.0
_GRACE_S = 5.0  # open responses given this long to finish when the replica stops


class _ReplicaServer(uvicorn.Server):
    """uvicorn without its signal handlers: the replica's process owns SIGINT and SIGTERM."""

    def capture_signals(self):
        return contextlib.nullcontext()


class HttpListener:
    """A uvicorn server on this event loop, over a socket other replicas on the node may bind too."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, address: str):
        self._server, self._task, self.address = server, task, address

    async def stop(self) -> None:
        """Stop accepting; open responses get ``_GRACE_S`` to finish, then are cancelled."""
        self._server.should_exit = True
        await asyncio.wait_for(self._task, _GRACE_S + 5.0)


async def start_http_listener(app: FastAPI, host: str, port: int) -> HttpListener:
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
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=int(_GRACE_S)
    )
    server = _ReplicaServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    deadline = asyncio.get_running_loop().time() + _START_TIMEOUT_S
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"HTTP on {host}:{port} stopped before it started")
        if asyncio.get_running_loop().time() > deadline:
            server.should_exit = True
            raise TimeoutError(f"HTTP on {host}:{port} did not start within {_START_TIMEOUT_S:g} s")
        await asyncio.sleep(0.02)
    return HttpListener(server, task, f"{host}:{port}")
