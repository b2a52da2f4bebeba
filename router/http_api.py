"""The OpenAI-compatible HTTP front end: completions, chat completions, models; SSE when streaming;
vLLM's ``/tokenize``, ``/detokenize`` and ``/version``.

Response objects are written here as plain dicts in the OpenAI wire shape.
Ray Serve LLM's OpenAI protocol models import vLLM, and the router must not
load torch or vLLM, so they are not reused. Errors use OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from functools import cache

from fastapi.responses import JSONResponse, StreamingResponse

from engine.types import TokenLogprob, ToolCallDelta
from router.placement import NoWorkerError
from router.request import (
    GenerationRequest,
    Kind,
    RequestError,
    fan_out,
    parse_detokenize_request,
    parse_tokenize_request,
    tokenize_only,
)
from router.sequences import all_or_none, interleaved
from router.service import Chunk, GenerationService, ModelInfo, PoisonRequestError, ServiceFullError, WorkerGoneError
from router.versions import versions

log = logging.getLogger(__name__)


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def unauthorized(message: str) -> JSONResponse:
    response = error_response(401, message, "authentication_error")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def generate(service: GenerationService, body: bytes, kind: Kind):
    """One response for every sequence the body asks for (``n``, a batch of prompts): each sequence is a
    request of the service's own, and every one's first chunk is in before the status is sent."""
    try:
        split = fan_out(body, kind, service.limits)
        requests = [service.parse(sub, kind) for sub in split.bodies]
    except RequestError as exc:
        return error_response(exc.http_status, str(exc), "invalid_request_error", exc.field)
    except Exception as exc:  # a body that breaks something past validation: still a 400 in OpenAI's shape
        log.warning("a %s body could not be read: %r", kind, exc)
        return error_response(400, f"the request could not be read: {exc!r}"[:2000], "invalid_request_error")
    streams = [service.generate(request, token_ids, split.shares_prompt_with(i))
               for i, (request, token_ids) in enumerate(requests)]  # fmt: skip
    try:  # the first chunks come before the response starts, so placement errors get their status
        firsts = await all_or_none(anext(stream) for stream in streams)
    except Exception as exc:
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
        return _failure(exc, split.request_id, before_output=True)
    echoes = [_echo(request, ids, service) for request, ids in requests]
    shape = _Shape(service.model, requests[0][0], kind, split.request_id, split.first_copies, echoes)
    if requests[0][0].stream:
        return StreamingResponse(_sse(shape, firsts, streams), media_type="text/event-stream")
    try:
        choices = await all_or_none(_rest(first, stream) for first, stream in zip(firsts, streams, strict=True))
    except Exception as exc:
        return _failure(exc, split.request_id, before_output=False)
    return JSONResponse(shape.whole(choices))


def _echo(request: GenerationRequest, token_ids: list[int], service: GenerationService) -> _Echo | None:
    """What an echoed completion repeats: its prompt's text (as sent, or its ids decoded) and token texts."""
    if not request.echo:
        return None
    text = request.prompt if request.prompt is not None else service.tokenizer.decode(token_ids, False)
    return _Echo(text, token_ids, service.tokenizer.decode(token_ids[:1], False))


@dataclass(frozen=True)
class _Echo:
    text: str
    token_ids: list[int]
    first_token: str  # the prompt's first token has no logprob (nothing precedes it), only its text


async def _rest(first: Chunk, stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [first, *[chunk async for chunk in stream]]


def _failure(exc: Exception, request_id: str, before_output: bool) -> JSONResponse:
    """A request that failed, in OpenAI's error shape with the status its cause calls for."""
    if isinstance(exc, ServiceFullError):
        return error_response(429, str(exc), "rate_limit_error")
    if isinstance(exc, RequestError):
        return error_response(exc.http_status, str(exc), "invalid_request_error", exc.field)
    if isinstance(exc, NoWorkerError | WorkerGoneError):
        return error_response(503, f"request {request_id} failed: {exc}", "service_unavailable")
    if isinstance(exc, PoisonRequestError):
        return error_response(500, str(exc), "worker_crash")
    if isinstance(exc, StopAsyncIteration):
        return error_response(500, "the request produced no output", "internal_error")
    where = "before its first token" if before_output else "mid-request"
    log.warning("request %s failed %s: %r", request_id, where, exc)
    return error_response(500, f"request {request_id} failed: {exc!r}"[:2000], "internal_error")


def models(service: GenerationService) -> dict:
    model = service.model
    card = {"id": model.model_id, "object": "model", "created": 0, "owned_by": "pdserve",
            "max_model_len": model.context_length, "vocab_size": model.vocab_size}  # fmt: skip
    return {"object": "list", "data": [card]}


def tokenize(service: GenerationService, body: bytes) -> JSONResponse:
    """vLLM's ``/tokenize``: the ids a completion (``prompt``) or a chat (``messages``) would be given."""
    try:
        request = parse_tokenize_request(body, service.limits)
        service.check_model(request.model)
        ids = tokenize_only(request, service.tokenizer)
    except RequestError as exc:
        return error_response(exc.http_status, str(exc), "invalid_request_error", exc.field)
    strings = service.tokenizer.token_strings(ids) if request.return_token_strs else None
    body = {"count": len(ids), "max_model_len": service.limits.context_length, "tokens": ids, "token_strs": strings}
    return JSONResponse(body)


def detokenize(service: GenerationService, body: bytes) -> JSONResponse:
    """vLLM's ``/detokenize``: the text of ``tokens``, special tokens included."""
    try:
        model, tokens = parse_detokenize_request(body, service.limits)
        service.check_model(model)
    except RequestError as exc:
        return error_response(exc.http_status, str(exc), "invalid_request_error", exc.field)
    return JSONResponse({"prompt": service.tokenizer.decode(tokens, skip_special_tokens=False)})


@cache
def system_fingerprint(model: ModelInfo) -> str:
    """OpenAI's ``system_fingerprint``: the same while the serving configuration (pdserve's and vLLM's versions,
    the model and its limits) is, so a client can tell when outputs may change for that reason."""
    served = versions()
    facts = [served["version"], served["vllm_version"], model.model_id, model.block_size, model.context_length,
             model.vocab_size, model.tool_call_parser]  # fmt: skip
    return "fp_" + hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:12]


async def _sse(shape: _Shape, firsts: list[Chunk], streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[bytes]:
    """Every sequence's chunks as they come, each under its choice index; the usage of them all at the end."""
    try:
        if shape.kind == "chat":
            for index in range(len(streams)):
                yield _event(shape.chunk({"role": "assistant", "content": ""}, index))
        ends: list[Chunk | None] = [None] * len(streams)
        async with contextlib.aclosing(interleaved(streams, firsts)) as chunks:
            async for index, chunk in chunks:
                if chunk.finish_reason is not None:
                    ends[index] = chunk
                elif shape.reads_tool_calls and not (chunk.text or chunk.tool_calls or chunk.logprobs):
                    continue  # a step whose text the tool-call parser holds back: nothing to send, as in vLLM
                yield _event(shape.chunk(chunk, index))
        if shape.request.include_usage:
            yield _event({**shape.header("chunk"), "choices": [], "usage": shape.usage(ends)})
    except WorkerGoneError as exc:  # the status is sent: the failure is an error event, as vLLM's server does
        yield _event({"error": {"message": str(exc), "type": "service_unavailable", "param": None, "code": 503}})
    except PoisonRequestError as exc:
        yield _event({"error": {"message": str(exc), "type": "worker_crash", "param": None, "code": 500}})
    except Exception as exc:
        log.warning("request %s failed mid-stream: %r", shape.id, exc)
        yield _event({"error": {"message": f"{exc!r}"[:2000], "type": "internal_error", "param": None, "code": 500}})
    finally:
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
    yield b"data: [DONE]\n\n"  # after an error event too, as vLLM's server ends every stream


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _Shape:
    """The OpenAI object shapes for one request's choices (completion or chat, whole or chunked)."""

    def __init__(
        self,
        model: ModelInfo,
        request: GenerationRequest,
        kind: Kind,
        request_id: str,
        first_copies: list[bool],
        echoes: list[_Echo | None],
    ):
        self.model_id = model.model_id
        self.fingerprint = system_fingerprint(model)
        self.request = request  # the first sequence's: every one shares its output options
        self.reads_tool_calls = kind == "chat" and request.sampling.tool_use is not None
        self.kind = kind
        self.created = int(time.time())
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self._first_copies = first_copies
        self._echoes = echoes
        self._echoed = [False] * len(echoes)  # a streamed choice's prompt goes out with its first chunk
        self._text_offsets = [0] * len(first_copies)  # per choice: where its next token's text starts (logprobs)

    def header(self, part: str) -> dict:
        if self.kind == "chat":
            kind = "chat.completion.chunk" if part == "chunk" else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                "system_fingerprint": self.fingerprint}  # fmt: skip

    def chunk(self, chunk: Chunk | dict, index: int) -> dict:
        """One SSE event's object: a ``Chunk`` of choice ``index``, or (chat) its opening ``{"role": ...}``."""
        if isinstance(chunk, dict):
            choice = {"index": index, "delta": chunk, "logprobs": None, "finish_reason": None}
            return {**self.header("chunk"), "choices": [choice]}
        logprobs = self._logprobs(chunk.logprobs, index)
        if self.kind == "chat":
            delta: dict = {"content": chunk.text} if chunk.text or not chunk.tool_calls else {}
            if chunk.tool_calls:
                delta["tool_calls"] = [_tool_call_piece(call) for call in chunk.tool_calls]
            choice = {"index": index, "delta": delta, "logprobs": logprobs}
        else:
            echo = self._echoes[index] if not self._echoed[index] else None
            self._echoed[index] = True
            choice = {"index": index, "text": (echo.text if echo else "") + chunk.text, "logprobs": logprobs}
        choice.update(finish_reason=chunk.finish_reason, stop_reason=chunk.stop_reason)
        return {**self.header("chunk"), "choices": [choice]}

    def whole(self, choices: list[list[Chunk]]) -> dict:
        body = {**self.header("whole"), "choices": [self._choice(chunks, i) for i, chunks in enumerate(choices)]}
        body["usage"] = self.usage([chunks[-1] for chunks in choices])
        last = choices[0][-1]  # an aborted request's last chunk has no usage or timing
        body["pdserve"] = {"token_ids": [t for c in choices[0] for t in c.token_ids],
                           "timing": asdict(last.timing) if last.timing else None,
                           "kv_transferred_tokens": last.usage.kv_transferred_tokens if last.usage else 0}  # fmt: skip
        if len(choices) > 1:
            body["pdserve"]["choices_token_ids"] = [[t for c in chunks for t in c.token_ids] for chunks in choices]
        if self.kind == "chat" and self.request.sampling.prompt_logprobs is not None:  # vLLM's: one prompt, top level
            body["prompt_logprobs"] = _prompt_logprobs(choices[0][0].prompt_logprobs)
        return body

    def usage(self, ends: list[Chunk]) -> dict:
        """Every choice's completion tokens; each prompt's tokens once, however many copies sampled it (vLLM's)."""
        prompts = [end.usage for end, first in zip(ends, self._first_copies, strict=True) if first and end.usage]
        prompt_tokens = sum(u.prompt_tokens for u in prompts)
        completion_tokens = sum(end.usage.completion_tokens for end in ends if end.usage)
        return {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_prompt_tokens for u in prompts)},
        }  # fmt: skip

    def _choice(self, chunks: list[Chunk], index: int) -> dict:
        text = "".join(c.text for c in chunks)
        last, prompt_logprobs, echo = chunks[-1], chunks[0].prompt_logprobs, self._echoes[index]
        entries = tuple(t for c in chunks for t in c.logprobs or ())
        if echo is not None:  # the prompt's tokens first: the first has no logprob
            text = echo.text + text
            entries = (*(prompt_logprobs or [None] * len(echo.token_ids)), *entries)
        logprobs = self._logprobs(entries, index, echo)
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            if self.reads_tool_calls:
                calls = _joined_tool_calls(c.tool_calls for c in chunks)
                message.update(content=text or (None if calls else ""), tool_calls=calls)
            choice = {"index": index, "message": message, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs}
        choice.update(finish_reason=last.finish_reason, stop_reason=last.stop_reason)
        if self.kind == "completion" and self.request.sampling.prompt_logprobs is not None:  # each its prompt's
            choice["prompt_logprobs"] = _prompt_logprobs(prompt_logprobs)
        return choice

    def _logprobs(
        self, entries: tuple[TokenLogprob | None, ...] | None, index: int, echo: _Echo | None = None
    ) -> dict | None:
        """OpenAI's logprobs object for ``entries`` (None when the request did not ask for them): a chat's
        ``content`` list, or a completion's parallel lists with each token's offset in its choice's text (an
        echoed prompt's first token, which has no logprob, as null)."""
        if self.request.sampling.logprobs is None:
            return None
        entries = entries or ()
        if self.kind == "chat":
            return {"content": [{**_token_entry(e.token, e.logprob),
                                 "top_logprobs": [_token_entry(text, lp) for _, text, lp in e.top]}
                                for e in entries]}  # fmt: skip
        tokens = [e.token if e is not None else echo.first_token if echo else "" for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offsets[index])
            self._text_offsets[index] += len(token)
        return {
            "text_offset": offsets,
            "token_logprobs": [None if e is None else _finite(e.logprob) for e in entries],
            "tokens": tokens,
            "top_logprobs": [None if e is None else
                             {text: _finite(lp) for _, text, lp in (*e.top, (e.token_id, e.token, e.logprob))}
                             for e in entries],
        }  # fmt: skip


def _tool_call_piece(call: ToolCallDelta) -> dict:
    """OpenAI's streamed tool-call delta: id, type and name on a call's first piece only."""
    piece: dict = {"index": call.index}
    if call.id is not None:
        piece.update(id=call.id, type="function")
    function = {"arguments": call.arguments}
    if call.name is not None:
        function["name"] = call.name
    piece["function"] = function
    return piece


def _joined_tool_calls(pieces) -> list[dict]:
    """A whole response's tool calls: each call's streamed pieces joined, in call order."""
    calls: dict[int, dict] = {}
    for call in (call for step in pieces for call in step):
        empty = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        whole = calls.setdefault(call.index, empty)
        whole["id"] = whole["id"] or call.id
        whole["function"]["name"] += call.name or ""
        whole["function"]["arguments"] += call.arguments
    return [calls[index] for index in sorted(calls)]


def _prompt_logprobs(entries: tuple[TokenLogprob | None, ...] | None) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, token id → logprob, rank and text (None for the first)."""
    return [None if e is None else _vllm_logprobs(e) for e in entries or ()]


def _vllm_logprobs(entry: TokenLogprob) -> dict:
    """vLLM's ``prompt_logprobs`` entry: the token and the likeliest ones, by id, with rank and text."""
    ranked = {str(t): {"logprob": _finite(lp), "rank": rank, "decoded_token": text}
              for rank, (t, text, lp) in enumerate(entry.top, start=1)}  # fmt: skip
    ranked[str(entry.token_id)] = {"logprob": _finite(entry.logprob), "rank": entry.rank, "decoded_token": entry.token}
    return ranked


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def _finite(logprob: float) -> float:
    """-inf is not JSON: vLLM's server clamps a logprob at -9999."""
    return max(logprob, -9999.0)
