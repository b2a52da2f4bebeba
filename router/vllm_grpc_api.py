"""vLLM's gRPC API, ``vllm.grpc.engine.VllmEngine``, on pdserve's gRPC port beside ``pdserve.v1.Generation``.

The proto is the one vLLM's ``--grpc`` server and SGLang's model gateway speak, published as
``smg-grpc-proto`` (pinned in pyproject.toml; pure protobuf, so the router still loads no torch or vLLM):
token ids in, token ids out, the caller tokenizing with the bundle ``GetTokenizer`` streams. A gateway
that drives vLLM workers drives a pdserve service the same way, and each request is placed, prefilled
and decoded by pdserve like any other. pdserve's disaggregation stays behind the port: it announces no KV
connector, and a request that brings KV transfer parameters, media or a data-parallel rank is refused
``INVALID_ARGUMENT`` naming the field, as is every field pdserve cannot honour. ``Embed``, ``FlushCache``,
the profiler and ``SubscribeKvEvents`` answer ``UNIMPLEMENTED``.

Semantics follow vLLM's servicer (smg-grpc-servicer): streamed, a chunk per step of each of the ``n``
sequences (its new token ids, their logprobs, the prompt's on its first) and a ``complete`` when one
ends, carrying that last step's tokens again, as vLLM's does; not streamed, one ``complete`` per
sequence with all of its tokens. A sampling field left unset means vLLM's default: ``max_tokens`` the
rest of the context, ``top_k`` / ``top_p`` / ``repetition_penalty`` off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
from smg_grpc_proto import vllm_engine_pb2 as vpb
from smg_grpc_proto import vllm_engine_pb2_grpc as vpb_grpc
from smg_grpc_proto.generated import common_pb2

from engine.types import TokenLogprob
from router.auth import ApiKeys
from router.grpc_errors import failure_status
from router.request import MAX_LOGPROBS, RequestError, fan_out
from router.sequences import all_or_none, interleaved
from router.service import Chunk, GenerationService
from router.versions import versions

log = logging.getLogger(__name__)

SERVICE_NAME = vpb.DESCRIPTOR.services_by_name["VllmEngine"].full_name
add_VllmEngineServicer_to_server = vpb_grpc.add_VllmEngineServicer_to_server
# Every file the router reads from the model directory (tokenization, chat template, GetModelInfo, GetTokenizer).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)  # fmt: skip
_TOKENIZER_CHUNK = 64 * 1024


class VllmEngineServicer(vpb_grpc.VllmEngineServicer):
    """Every method wants an API key when keys are configured (``authorization`` metadata), as pdserve's own."""

    def __init__(self, service: GenerationService, keys: ApiKeys):
        self._service = service
        self._keys = keys
        self._started = time.time()
        self._last_request = 0.0
        self._sequences: dict[str, list[str]] = {}  # a running request's id → its sequences' (n > 1: one each)
        self._tokenizer_bundle: tuple[bytes, str] | None = None

    async def Generate(self, request: vpb.GenerateRequest, context: grpc.aio.ServicerContext):
        await self._keys.admit_grpc(context)
        self._last_request = time.time()
        service = self._service
        try:
            body, spaces = _request_body(request, service)
            split = fan_out(json.dumps(body).encode(), "completion", service.limits)
            sequences = []
            for sub in split.bodies:
                parsed, token_ids = service.parse(sub, "completion")
                sampling = replace(parsed.sampling, spaces_between_special_tokens=spaces)
                sequences.append((replace(parsed, sampling=sampling), token_ids))
        except RequestError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], str(exc))
        except Exception as exc:  # something past validation could not take the request: still the caller's answer
            log.warning("a VllmEngine Generate request could not be read: %r", exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request could not be read: {exc!r}"[:2000])
        self._sequences[split.request_id] = [parsed.request_id for parsed, _ in sequences]
        streams = [service.generate(parsed, token_ids, split.shares_prompt_with(i))
                   for i, (parsed, token_ids) in enumerate(sequences)]  # fmt: skip
        prompts = [token_ids for _, token_ids in sequences]
        try:
            if request.stream:
                async with contextlib.aclosing(interleaved(streams)) as chunks:
                    async for index, chunk in chunks:
                        for message in _streamed(chunk, index, prompts[index]):
                            yield message
            else:
                whole = await all_or_none(_whole(stream) for stream in streams)
                for index, chunks in enumerate(whole):
                    yield _complete(chunks, index, prompts[index])
        except Exception as exc:
            await context.abort(*failure_status(exc, split.request_id))
        finally:
            self._sequences.pop(split.request_id, None)
            await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)

    async def Abort(self, request: vpb.AbortRequest, context) -> vpb.AbortResponse:
        """Ends each named request (every one of its sequences); unknown ids are no error, as in vLLM."""
        await self._keys.admit_grpc(context)
        for request_id in request.request_ids:
            for sequence in self._sequences.get(request_id, [request_id]):
                await self._service.abort(sequence)
        return vpb.AbortResponse()

    async def HealthCheck(self, request, context) -> vpb.HealthCheckResponse:
        """Healthy while a decode worker is live: what ``GET /health`` answers 200 to."""
        await self._keys.admit_grpc(context)
        live = (await self._service.pool_health())["decode"]["live"]
        message = f"{live} live decode worker(s)" if live else "no live decode worker"
        return vpb.HealthCheckResponse(healthy=bool(live), message=message)

    async def GetModelInfo(self, request, context) -> vpb.GetModelInfoResponse:
        await self._keys.admit_grpc(context)
        model, tokenizer = self._service.model, self._service.tokenizer
        directory = Path(model.model_dir)
        config = _json_file(directory / "config.json")
        generation = _json_file(directory / "generation_config.json")
        eos = generation.get("eos_token_id", config.get("eos_token_id", tokenizer.eos_token_id))
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        return vpb.GetModelInfoResponse(
            model_path=model.model_dir, is_generation=True, max_context_length=model.context_length,
            vocab_size=model.vocab_size, supports_vision=False, served_model_name=model.model_id,
            tokenizer_path=model.model_dir, model_type=config.get("model_type", ""),
            architectures=config.get("architectures", []), eos_token_ids=eos,
            pad_token_id=_token_id(config.get("pad_token_id")), bos_token_id=_token_id(config.get("bos_token_id")),
            max_req_input_len=model.context_length - 1, default_sampling_params_json="",
        )  # fmt: skip

    async def GetServerInfo(self, request, context) -> vpb.GetServerInfoResponse:
        """As a vLLM worker that does its own disaggregation: no KV connector for a gateway to pair."""
        await self._keys.admit_grpc(context)
        return vpb.GetServerInfoResponse(
            active_requests=self._service.running(), is_paused=False, last_receive_timestamp=self._last_request,
            uptime_seconds=time.time() - self._started, server_type="vllm-grpc", data_parallel_size=1,
            block_size=self._service.model.block_size,
        )  # fmt: skip

    async def GetLoads(self, request: vpb.GetLoadsRequest, context) -> vpb.GetLoadsResponse:
        """The decode pool's load as one scheduler's (pdserve spreads requests over its workers itself)."""
        await self._keys.admit_grpc(context)
        if request.HasField("dp_rank") and request.dp_rank != 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "dp_rank: pdserve answers as one rank, 0")
        decode = [w for w in await self._service.live_workers() if w.role == "decode"]
        running = sum(w.load.running_seqs for w in decode)
        waiting = sum(w.load.waiting_seqs for w in decode)
        usage = sum(w.load.kv_used_fraction for w in decode) / len(decode) if decode else 0.0
        load = vpb.SchedulerLoad(dp_rank=0, num_running_reqs=running, num_waiting_reqs=waiting,
                                 num_total_reqs=running + waiting, token_usage=usage)  # fmt: skip
        return vpb.GetLoadsResponse(timestamp=datetime.now(UTC).isoformat(), version=versions()["vllm_version"] or "",
                                    dp_rank_count=1, loads=[load])  # fmt: skip

    async def GetTokenizer(self, request, context) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        """The model directory's tokenizer files as one zip, in chunks; the last carries its SHA-256."""
        await self._keys.admit_grpc(context)
        if self._tokenizer_bundle is None:
            self._tokenizer_bundle = await asyncio.to_thread(_tokenizer_zip, Path(self._service.model.model_dir))
        data, digest = self._tokenizer_bundle
        for start in range(0, len(data), _TOKENIZER_CHUNK):
            end = min(start + _TOKENIZER_CHUNK, len(data))
            yield common_pb2.GetTokenizerChunk(data=data[start:end], sha256=digest if end == len(data) else "")


def _request_body(request: vpb.GenerateRequest, service: GenerationService) -> tuple[dict, bool]:
    """The request as the fields the one validator reads (the OpenAI completions names), and vLLM's
    ``spaces_between_special_tokens`` (which pdserve's HTTP API does not take)."""
    for name in ("kv_transfer_params", "kv_transfer_params_json", "mm_inputs", "media_refs", "data_parallel_rank"):
        if request.HasField(name):
            raise RequestError(name, "pdserve places, transfers and ranks requests itself; text prompts only")
    if request.extra_mm_inputs:
        raise RequestError("extra_mm_inputs", "pdserve serves text prompts only")
    which = request.WhichOneof("input")
    if which is None:
        raise RequestError("input", "give tokenized input_ids or text")
    prompt = list(request.tokenized.input_ids) if which == "tokenized" else request.text
    p = request.sampling_params
    body: dict = {"prompt": prompt, "skip_special_tokens": p.skip_special_tokens}
    if request.request_id:
        body["request_id"] = request.request_id
    optional = ("temperature", "seed", "truncate_prompt_tokens", "max_tokens")
    body.update({name: getattr(p, name) for name in optional if p.HasField(name)})
    unset_is_off = ("top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                    "min_tokens", "n", "ignore_eos", "include_stop_str_in_output")  # fmt: skip
    body.update({name: getattr(p, name) for name in unset_is_off if getattr(p, name)})
    if p.stop:
        body["stop"] = list(p.stop)
    if p.stop_token_ids:
        body["stop_token_ids"] = list(p.stop_token_ids)
    if p.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in p.logit_bias.items()}
    for name in ("logprobs", "prompt_logprobs"):
        if p.HasField(name):
            if getattr(p, name) == -1:
                raise RequestError(f"sampling_params.{name}", f"-1 (every token) is not served: at most {MAX_LOGPROBS}")
            body[name] = getattr(p, name)
    if (constraint := p.WhichOneof("constraint")) is not None:
        body["structured_outputs"] = _constraint(p, constraint)
    if "max_tokens" not in body:  # vLLM's default: the rest of the context
        body["max_tokens"] = max(1, service.limits.context_length - _prompt_length(prompt, body, service))
    return body, p.spaces_between_special_tokens


def _constraint(p: vpb.SamplingParams, constraint: str) -> dict:
    """The proto's one constraint in vLLM's ``structured_outputs`` names. No reasoning parser runs in pdserve's
    workers, so every constraint starts at the first generated token, as ``grammar_from_first_token`` asks."""
    if constraint == "json_schema":
        return {"json": p.json_schema}
    if constraint == "choice":
        return {"choice": list(p.choice.choices)}
    return {constraint: getattr(p, constraint)}


def _prompt_length(prompt: str | list[int], body: dict, service: GenerationService) -> int:
    """The prompt's tokens as generation will count them (after truncation), for vLLM's default ``max_tokens``."""
    length = len(prompt) if isinstance(prompt, list) else len(service.tokenizer.encode(prompt))
    keep = body.get("truncate_prompt_tokens")
    return min(length, keep) if keep and keep > 0 else length


async def _whole(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in stream]


def _streamed(chunk: Chunk, index: int, prompt: list[int]) -> list[vpb.GenerateResponse]:
    """A step of sequence ``index`` as vLLM's servicer streams it: its chunk, and where it ends, a ``complete``
    with that step's tokens (the caller has every earlier token from the chunks)."""
    usage = chunk.usage
    message = vpb.GenerateStreamChunk(
        token_ids=chunk.token_ids, prompt_tokens=len(prompt), completion_tokens=len(chunk.token_ids),
        cached_tokens=usage.cached_prompt_tokens if usage else 0, index=index,
    )  # fmt: skip
    if chunk.logprobs is not None:
        message.output_logprobs.CopyFrom(_output_logprobs(chunk.logprobs))
    if chunk.prompt_logprobs is not None:
        message.input_logprobs.CopyFrom(_input_logprobs(chunk.prompt_logprobs, prompt))
    messages = [vpb.GenerateResponse(chunk=message)]
    if chunk.finish_reason is not None:
        messages.append(_complete([chunk], index, prompt))
    return messages


def _complete(chunks: list[Chunk], index: int, prompt: list[int]) -> vpb.GenerateResponse:
    """Sequence ``index``'s end: the tokens of ``chunks`` (all of them, or the last step's when streamed)."""
    last = chunks[-1]
    tokens = [token for chunk in chunks for token in chunk.token_ids]
    message = vpb.GenerateComplete(
        output_ids=tokens, finish_reason=last.finish_reason or "abort", prompt_tokens=len(prompt),
        completion_tokens=len(tokens), cached_tokens=last.usage.cached_prompt_tokens if last.usage else 0,
        index=index,
    )  # fmt: skip
    logprobs = [entry for chunk in chunks for entry in chunk.logprobs or ()]
    if any(chunk.logprobs is not None for chunk in chunks):
        message.output_logprobs.CopyFrom(_output_logprobs(logprobs))
    if chunks[0].prompt_logprobs is not None:
        message.input_logprobs.CopyFrom(_input_logprobs(chunks[0].prompt_logprobs, prompt))
    if isinstance(last.stop_reason, int):
        message.matched_token_id = last.stop_reason
    elif isinstance(last.stop_reason, str):
        message.matched_stop_str = last.stop_reason
    return vpb.GenerateResponse(complete=message)


def _top(entry: TokenLogprob) -> vpb.TopLogProbs:
    return vpb.TopLogProbs(values=[lp for _, _, lp in entry.top], token_ids=[t for t, _, _ in entry.top])


def _output_logprobs(entries) -> vpb.OutputLogProbs:
    return vpb.OutputLogProbs(token_logprobs=[e.logprob for e in entries], token_ids=[e.token_id for e in entries],
                              top_logprobs=[_top(e) for e in entries])  # fmt: skip


def _input_logprobs(entries, prompt: list[int]) -> vpb.InputLogProbs:
    """The prompt's: the first token has no logprob (nothing precedes it), an empty value."""
    values = [vpb.InputTokenLogProb() if e is None else vpb.InputTokenLogProb(value=e.logprob) for e in entries]
    tops = [vpb.TopLogProbs() if e is None else _top(e) for e in entries]
    return vpb.InputLogProbs(token_logprobs=values, token_ids=prompt, top_logprobs=tops)


def _tokenizer_zip(directory: Path) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                bundle.write(directory / name, name)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _json_file(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_id(value) -> int:
    return value if isinstance(value, int) else 0  # the proto's unset, as vLLM's servicer leaves it
