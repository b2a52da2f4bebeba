"""What every engine kind does with a request on its way in and out: the checks it makes before the
request runs, and reading its deltas under the stall deadline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from engine.errors import EngineError, EngineInputError
from engine.types import GenerateRequest, OutputDelta


def check_prompt(request: GenerateRequest, vocab_size: int, max_model_len: int) -> None:
    """Its id, its token ids, and prompt plus ``max_tokens`` within the context: refused by field."""
    rid, ids = request.request_id, request.prompt_token_ids
    if not isinstance(rid, str) or not rid:
        raise EngineInputError("request_id", "must be a non-empty string")
    if not ids:
        raise EngineInputError("prompt_token_ids", "must not be empty", rid)
    bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise EngineInputError("prompt_token_ids", f"token id {bad!r} is outside [0, {vocab_size})", rid)
    total = len(ids) + request.sampling.max_tokens
    if total > max_model_len:
        raise EngineInputError(
            "max_tokens",
            f"prompt ({len(ids)} tokens) + max_tokens ({request.sampling.max_tokens}) = {total} "
            f"exceeds the context length {max_model_len}",
            rid,
        )


async def next_item(
    get: Callable[[float], Awaitable[OutputDelta | Exception]], request_id: str, stall_timeout_s: float
) -> OutputDelta | Exception:
    """The request's next delta, or the error delivered in its place, from ``get(timeout)``; a stall (no output
    for ``stall_timeout_s``) raises."""
    try:
        return await get(stall_timeout_s)
    except TimeoutError:
        raise EngineError(f"request {request_id} got no output for {stall_timeout_s:g} s") from None
