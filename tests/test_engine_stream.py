"""A request's deltas on their way from the engine's loop to the reader: a reader that falls behind catches up."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from engine.engine import _Stream
from engine.errors import EngineError
from engine.types import OutputDelta, TokenLogprob, ToolCallDelta


def delta(tokens: list[int], finish: str | None = None, prompt: int = 4, cached: int = 2) -> OutputDelta:
    done = tokens[-1] if tokens else 0
    return OutputDelta("r", tokens, "".join(f"<{t}>" for t in tokens), finish, prompt, done, cached)


def drain(items: list) -> list:
    async def run():
        stream = _Stream(asyncio.get_running_loop())
        for item in items:
            stream.put(item)
        got = []
        while len(got) == 0 or not (isinstance(got[-1], Exception) or got[-1].finished):
            got.append(await stream.get(1.0))
        return got

    return asyncio.run(run())


def test_deltas_queued_behind_a_slow_reader_arrive_as_one_in_order():
    (merged,) = drain([delta([1]), delta([2]), delta([3], "length")])
    assert merged.token_ids == [1, 2, 3] and merged.text == "<1><2><3>"
    assert (merged.finish_reason, merged.completion_tokens) == ("length", 3)
    assert (merged.prompt_tokens, merged.cached_prompt_tokens) == (4, 2)


def test_an_abort_behind_tokens_keeps_the_prompt_figures_of_the_first_delta():
    (merged,) = drain([delta([1]), OutputDelta("r", [], "", "abort", 0, 1, 0)])
    assert (merged.token_ids, merged.finish_reason, merged.prompt_tokens, merged.cached_prompt_tokens) == (
        [1], "abort", 4, 2,
    )  # fmt: skip


def test_an_error_is_never_merged_into_the_tokens_before_it():
    failure = EngineError("engine died")
    first, second = drain([delta([1]), delta([2]), failure])
    assert first.token_ids == [1, 2] and second is failure


def test_merged_deltas_keep_one_logprob_per_token_and_the_stop_reason_of_the_last():
    def scored(tokens: list[int], finish: str | None = None, stop: int | None = None) -> OutputDelta:
        logprobs = tuple(TokenLogprob(t, f"<{t}>", -0.1 * t) for t in tokens)
        return replace(delta(tokens, finish), logprobs=logprobs, stop_reason=stop)

    (merged,) = drain([scored([1]), scored([2, 3]), scored([4], "stop", stop=4)])
    assert [entry.token_id for entry in merged.logprobs] == merged.token_ids == [1, 2, 3, 4]
    assert merged.stop_reason == 4


def test_tool_call_pieces_merged_behind_a_slow_reader_are_one_piece_per_call():
    def with_calls(tokens, *pieces):
        return replace(delta(tokens), tool_calls=tuple(ToolCallDelta(*piece) for piece in pieces))

    items = [with_calls([1], (0, "call-a", "get", '{"c')), with_calls([2], (0, None, None, 'ity": 1}')),
             with_calls([3], (1, "call-b", "put", "{")), replace(delta([4], "stop"), tool_calls=())]  # fmt: skip
    (merged,) = drain(items)
    expected = (ToolCallDelta(0, "call-a", "get", '{"city": 1}'), ToolCallDelta(1, "call-b", "put", "{"))
    assert merged.tool_calls == expected
