"""The Router deployment: the HTTP front end (OpenAI API, health, metrics) and pdserve's gRPC server.

One replica holds one ``GenerationService``. With the in-memory index the
workers write to this replica's index over a listener of its own (the index
writer, on the node's address; they look it up with ``index_writer_address``),
so there is one router replica; with Redis they write to Redis and any number
of router replicas share it (each its own gRPC and HTTP listeners on the same
ports, SO_REUSEPORT). HTTP is served by the replica itself
(``router/http_server.py``) or, with ``service.http_server: serve_proxy``, by
Serve's proxy through this class's ingress app: the same handlers either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, replace

import ray
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr
from ray import serve

from engine.autoscaling_stats import HELD_PREFILL_TOKENS
from engine.model_source import ModelSource, ensure_model
from router import http_api
from router.auth import ApiKeys
from router.config import RouterConfig
from router.grpc_api import start_grpc_server
from router.http_server import start_http_listener
from router.index import make_index
from router.index.remote_writer import start_index_writer
from router.index.sweeper import IndexSweeper
from router.request_registry import make_registry
from router.serve_pools import ServeWorkerPools
from router.service import GenerationService, Mode, ModelInfo
from router.versions import versions
from router.vllm_grpc_api import TOKENIZER_FILES

app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
_DISCONNECT_POLL_S = 0.25  # how often a request still being answered looks whether its client is gone


@dataclass(frozen=True)
class IngressSettings:
    model: ModelInfo  # its figures read on the node that built the app; model_dir is each replica's own (below)
    router: RouterConfig
    cluster_token: SecretStr  # workers prove it to write into the in-memory index
    model_source: ModelSource  # its tokenizer and config files, made present on the replica's own node
    mode: Mode = "disaggregated"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 9000
    http: tuple[str, int] | None = None  # where this replica serves HTTP itself; None: Serve's proxy does
    http_grace_s: float = 15.0  # a stopping replica's open HTTP responses get this long to finish
    max_inflight: int = 256
    prefill_timeout_s: float = 60.0


async def _until_the_client_leaves(request: Request, response: Awaitable[Response]) -> Response:
    """``response``, cancelled if the client goes away before it is ready (a whole completion, or a stream's
    first chunk): its requests are then aborted on the workers. A stream that has started is watched by its
    own response."""
    work = asyncio.ensure_future(response)
    try:
        while not (await asyncio.wait({work}, timeout=_DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        return work.result()
    finally:
        work.cancel()  # this handler itself cancelled: the work goes too


@serve.deployment(name="Router", health_check_period_s=5)
@serve.ingress(app)
class Router:
    async def __init__(self, settings: IngressSettings, prefill_handle, decode_handle):
        self._http = None
        model_dir = await asyncio.to_thread(ensure_model, settings.model_source, TOKENIZER_FILES)
        settings = replace(settings, model=replace(settings.model, model_dir=str(model_dir)))
        index_config = settings.router.index
        redis_url = index_config.connection_url()  # as this node has it: ${NAME} expanded, the password file read
        self._index = make_index(redis_url, settings.model.model_id, index_config.timeout_s)
        self._sweeper = IndexSweeper(self._index, index_config.sweep_interval_s).start()
        pools = ServeWorkerPools(prefill_handle, decode_handle)
        router_id = serve.get_replica_context().replica_id.unique_id
        self._registry = make_registry(index_config, settings.model.model_id, router_id)
        self.service = GenerationService(
            settings.model, settings.router, self._index, pools, settings.mode, settings.max_inflight,
            settings.prefill_timeout_s, router_id, self._registry,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        self._registry.start(lambda request_id: loop.call_soon_threadsafe(self.service.abort_local, request_id))
        self._keys = ApiKeys([key.get_secret_value() for key in settings.router.api_keys])
        self._grpc = await start_grpc_server(self.service, settings.grpc_host, settings.grpc_port, self._keys)
        self._index_writer, self._index_writer_address = None, None
        if redis_url is None:
            token = settings.cluster_token.get_secret_value()
            host = ray.util.get_node_ip_address()
            self._index_writer, self._index_writer_address = await start_index_writer(self._index, host, token)
        if settings.http is not None:  # Serve's ingress app, whose handlers get this replica once Serve has it

            def ready() -> bool:
                return serve.get_replica_context().servable_object is self

            self._http = start_http_listener(app, *settings.http, settings.http_grace_s, ready)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        if refusal := self._keys.refusal(request.headers.get("authorization")):
            return http_api.unauthorized(refusal)
        return await self._answer(request, http_api.generate(self.service, await request.body(), "completion"))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        if refusal := self._keys.refusal(request.headers.get("authorization")):
            return http_api.unauthorized(refusal)
        return await self._answer(request, http_api.generate(self.service, await request.body(), "chat"))

    @app.get("/v1/models")
    async def models(self, request: Request):
        if refusal := self._keys.refusal(request.headers.get("authorization")):
            return http_api.unauthorized(refusal)
        return http_api.models(self.service)

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        if refusal := self._keys.refusal(request.headers.get("authorization")):
            return http_api.unauthorized(refusal)
        return http_api.tokenize(self.service, await request.body())

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        if refusal := self._keys.refusal(request.headers.get("authorization")):
            return http_api.unauthorized(refusal)
        return http_api.detokenize(self.service, await request.body())

    @app.get("/version")
    async def version(self):
        return versions()

    @app.get("/health")
    async def health(self):
        """200 while a decode worker is live ("degraded" while a pool waits for a replacement), else 503."""
        pools = await self.service.pool_health()
        degraded = {role: pool["degraded"] for role, pool in pools.items() if pool["degraded"]}
        if not pools["decode"]["live"]:
            why = "; ".join(degraded.get("decode", [])) or "none has reported yet"
            return http_api.error_response(503, f"no live decode worker ({why})", "service_unavailable")
        return {"status": "degraded" if degraded else "ok", "mode": self.service.mode,
                "live_workers": {role: pool["live"] for role, pool in pools.items()}, "degraded": degraded}  # fmt: skip

    @app.get("/metrics")
    async def metrics(self):
        return Response(await self.service.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    def index_writer_address(self) -> str:
        """Where workers write to this replica's in-memory index (``host:port``)."""
        if self._index_writer_address is None:
            raise RuntimeError("this router's index is in Redis: workers write there")
        return self._index_writer_address

    async def _answer(self, request: Request, response: Awaitable[Response]) -> Response:
        """Behind Serve's proxy, the proxy cancels this handler when the client goes; served here, nobody
        does, so this replica watches for it."""
        return await (_until_the_client_leaves(request, response) if self._http is not None else response)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The prompt tokens this replica holds for the prefill pool: load on that pool (``CoordinatedPolicy``)."""
        return {HELD_PREFILL_TOKENS: float(self.service.prefill_queue.tokens)}

    def check_health(self) -> None:
        if self._http is not None and (why := self._http.failure()):
            raise RuntimeError(why)

    async def __del__(self):
        try:
            if self._http is not None:
                await self._http.stop()
        finally:
            await self._stop_the_rest()

    async def _stop_the_rest(self) -> None:
        self._sweeper.stop()
        self._registry.close()
        await self._grpc.stop(grace=1.0)
        if self._index_writer is not None:
            await self._index_writer.stop(grace=1.0)
