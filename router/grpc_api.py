"""The gRPC front end: ``pdserve.v1.Generation`` and vLLM's ``VllmEngine`` (router/vllm_grpc_api.py), plus
``grpc.health.v1`` and server reflection.

The server belongs to the Router deployment (one per replica, started with it,
SO_REUSEPORT so replicas on one node share the port) rather than Ray Serve's
gRPC proxy: the proxy routes by an ``application`` metadata key and serves
neither the standard health service nor reflection, which internal clients
and tools (grpcurl, grpc-health-probe) expect.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve_pb.v1 import generate_pb2 as pb
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc
from router.auth import ApiKeys
from router.grpc_errors import failure_status
from router.request import RequestError
from router.service import Chunk, GenerationService
from router.vllm_grpc_api import SERVICE_NAME as VLLM_SERVICE_NAME
from router.vllm_grpc_api import VllmEngineServicer, add_VllmEngineServicer_to_server

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"  # a Generate's initial metadata, sent once it is admitted

_SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def request_body(request: pb.GenerateRequest) -> dict:
    """The request as the fields the one validator reads (the OpenAI completions names)."""
    body: dict = {}
    if request.request_id:
        body["request_id"] = request.request_id
    if request.model:
        body["model"] = request.model
    which = request.WhichOneof("prompt")
    if which == "text":
        body["prompt"] = request.text
    elif which == "token_ids":
        body["prompt"] = list(request.token_ids.ids)
    sampling = request.sampling
    for name in _SAMPLING_FIELDS:
        if sampling.HasField(name):
            body[name] = getattr(sampling, name)
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        body["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    if sampling.min_tokens:
        body["min_tokens"] = sampling.min_tokens
    if sampling.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias.items()}
    if sampling.allowed_token_ids:
        body["allowed_token_ids"] = list(sampling.allowed_token_ids)
    if sampling.include_stop_str_in_output:
        body["include_stop_str_in_output"] = True
    if sampling.bad_words:
        body["bad_words"] = list(sampling.bad_words)
    for name in ("skip_special_tokens", "truncate_prompt_tokens", "logprobs"):
        if sampling.HasField(name):
            body[name] = getattr(sampling, name)
    return body


def response(chunk: Chunk) -> pb.GenerateResponse:
    message = pb.GenerateResponse(request_id=chunk.request_id, token_ids=chunk.token_ids, text=chunk.text)
    if chunk.finish_reason is not None:
        message.finish_reason = chunk.finish_reason
    if isinstance(chunk.stop_reason, int):
        message.stop_token_id = chunk.stop_reason
    elif isinstance(chunk.stop_reason, str):
        message.stop_string = chunk.stop_reason
    for entry in chunk.logprobs or ():
        top = [pb.TopLogprob(token_id=t, token=text, logprob=lp) for t, text, lp in entry.top]
        message.logprobs.append(
            pb.TokenLogprob(token_id=entry.token_id, token=entry.token, logprob=entry.logprob, top=top)
        )
    if chunk.usage is not None:
        u = chunk.usage
        message.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                        cached_prompt_tokens=u.cached_prompt_tokens,
                                        kv_transferred_tokens=u.kv_transferred_tokens))  # fmt: skip
    if chunk.timing is not None:
        t = chunk.timing
        message.timing.CopyFrom(pb.Timing(ttft_s=t.ttft_s, e2e_s=t.e2e_s, placement=t.placement,
                                          prefill_worker=t.prefill_worker, decode_worker=t.decode_worker,
                                          router=t.router, migrations=t.migrations,
                                          ttft_parts_s=t.ttft_parts))  # fmt: skip
    return message


class GenerationServicer(pb_grpc.GenerationServicer):
    """Every method wants an API key when keys are configured (``authorization`` metadata)."""

    def __init__(self, service: GenerationService, keys: ApiKeys):
        self._service = service
        self._keys = keys

    async def _admit(self, request, context: grpc.aio.ServicerContext) -> None:
        await self._keys.admit_grpc(context)
        if isinstance(request, Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {request.reason}")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        await self._admit(request, context)
        try:
            parsed, token_ids = self._service.parse(request_body(request), "completion")
        except RequestError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], str(exc))
        except Exception as exc:  # something past validation could not take the request: still the caller's answer
            log.warning("a Generate request could not be read: %r", exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request could not be read: {exc!r}"[:2000])

        async def admitted() -> None:  # the caller learns the id to abort by before the first token
            await context.send_initial_metadata(((REQUEST_ID_HEADER, parsed.request_id),))

        try:
            async for chunk in self._service.generate(parsed, token_ids, on_admitted=admitted):
                yield response(chunk)
        except Exception as exc:
            await context.abort(*failure_status(exc, parsed.request_id))

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        await self._admit(request, context)
        return pb.AbortResponse(found=await self._service.abort(request.request_id))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        await self._admit(request, context)
        model = self._service.model
        card = pb.ModelCard(id=model.model_id, context_length=model.context_length, block_size=model.block_size)
        return pb.ListModelsResponse(models=[card])

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        await self._admit(request, context)
        service = self._service
        health_now = service.index.health()
        held = await asyncio.to_thread(service.index.held_blocks)
        workers = [
            pb.WorkerStatus(
                worker_id=w.worker_id, role=w.role, running_seqs=w.load.running_seqs, waiting_seqs=w.load.waiting_seqs,
                queued_prefill_tokens=w.load.queued_prefill_tokens, kv_used_fraction=w.load.kv_used_fraction,
                cached_blocks=held.get(w.worker_id, 0), in_flight=w.in_flight.requests, cpu_cores=w.cpu_cores,
                placed_prefill_tokens=w.in_flight.tokens,
            )
            for w in sorted(await service.live_workers(), key=lambda w: (w.role, w.worker_id))
        ]  # fmt: skip
        return pb.StatusResponse(
            model=service.model.model_id, mode=service.mode, policy=service.config.placement.policy, workers=workers,
            index_available=health_now.available, index_outages=health_now.outages,
            requests_running=service.running(), prompt_tokens=service.prompt_tokens_total,
            prefix_hit_tokens=service.prefix_hit_tokens_total,
            prefill_held_requests=service.prefill_queue.requests, prefill_held_tokens=service.prefill_queue.tokens,
        )  # fmt: skip


@dataclass(frozen=True)
class Unparsable:
    """Request bytes that are not the method's message (e.g. a string that is not UTF-8)."""

    reason: str


def _lenient(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Unparsable(str(exc))

    return parse


def _add_generation(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """As the generated ``add_GenerationServicer_to_server``, except that a request that does not parse
    reaches the method (answered INVALID_ARGUMENT, naming the problem) instead of failing in grpc as UNKNOWN."""
    unary, streaming = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    handlers = {
        name: kind(getattr(servicer, name), _lenient(request), response.SerializeToString)
        for name, kind, request, response in (
            ("Generate", streaming, pb.GenerateRequest, pb.GenerateResponse),
            ("Abort", unary, pb.AbortRequest, pb.AbortResponse),
            ("ListModels", unary, pb.ListModelsRequest, pb.ListModelsResponse),
            ("Status", unary, pb.StatusRequest, pb.StatusResponse),
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pdserve.v1.Generation", handlers),))


async def start_grpc_server(
    service: GenerationService, host: str, port: int, keys: ApiKeys | None = None
) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    _add_generation(GenerationServicer(service, keys or ApiKeys([])), server)
    add_VllmEngineServicer_to_server(VllmEngineServicer(service, keys or ApiKeys([])), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        pb.DESCRIPTOR.services_by_name["Generation"].full_name,
        VLLM_SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"gRPC cannot listen on {host}:{port}")
    await server.start()
    for name in ("", names[0], names[1]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server
