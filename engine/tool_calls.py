"""A chat's tool calls, read from its output as vLLM's OpenAI server reads them, on the decode worker.

vLLM's parsers (``vllm.parser``, a model family's tool-call format by name: ``hermes``, ``llama3_json``,
``mistral``, ...) need vLLM and the model's tokenizer, which the router never loads; so the worker that
generates a chat's tokens reads them, one parser per request, and streams content and tool-call pieces in
OpenAI's shape. The parser also constrains the output first (``adjust_request``): for ``tool_choice:
required`` or a named function vLLM's JSON schema of the tools, or its structural tags where the model's
format has them, run by vLLM's structured outputs; so a forced call's arguments are valid JSON.

``auto`` needs a model parser (``engine.tool_call_parser``, vLLM's ``--tool-call-parser``); ``required``
and a named function work without one, read by vLLM's JSON path (``_JsonCallsOnly``). A parser keeps
state over a stream, so a tool-calling decode is not moved to another worker (router/service.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from engine.errors import EngineConfigError
from engine.types import ToolCallDelta, ToolUse


def tool_call_parser(name: str | None) -> type:
    """vLLM's parser class for ``name`` (None: required and named calls only), known before vLLM loads the
    model, so a wrong name fails the engine's start at once."""
    from vllm.parser.abstract_parser import DelegatingParser
    from vllm.parser.parser_manager import ParserManager

    if name is None:
        return type("JsonToolCalls", (DelegatingParser,), {"tool_parser_cls": _json_calls_only()})
    try:
        parser = ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True)
    except (TypeError, KeyError, ValueError) as exc:
        raise EngineConfigError("tool_call_parser", f"{name!r} is not one of vLLM's tool call parsers: {exc}") from None
    if parser is None or parser.tool_parser_cls is None:
        raise EngineConfigError("tool_call_parser", f"{name!r} is not one of vLLM's tool call parsers")
    return parser


def check_tokenizer(parser: type, name: str | None, tokenizer) -> None:
    """The model's tokenizer has what the parser reads calls by (its delimiter tokens), as vLLM's server checks."""
    from vllm.parser.parser_manager import ParserManager

    try:
        ParserManager.validate_parser_tokenizer(parser, tokenizer, tool_parser_name=name)
    except TypeError as exc:
        raise EngineConfigError("tool_call_parser", str(exc)) from None


def _json_calls_only() -> type:
    from vllm.entrypoints.generate.base.protocol import DeltaMessage, ExtractedToolCallInformation
    from vllm.tool_parsers import ToolParser

    class _JsonCallsOnly(ToolParser):
        """No model format: free text holds no calls. Only ``required`` and named calls reach a request with
        it (the router refuses ``auto`` without a model parser), and vLLM reads those as JSON itself."""

        def extract_tool_calls(self, model_output, request):
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)

        def extract_tool_calls_streaming(self, previous_text, current_text, delta_text, *args):
            return DeltaMessage(content=delta_text) if delta_text else None

    return _JsonCallsOnly


class ToolCallReadError(RuntimeError):
    """vLLM's parser failed on the output: the worker's fault, not the request's."""


class ToolCallReader:
    """One request's output as content and tool-call pieces, with the constraints its tools put on sampling."""

    def __init__(
        self, parser_cls: type, tokenizer, model_config, use: ToolUse, skip_special_tokens: bool, structured_outputs
    ):
        """``structured_outputs``: the request's own constraint (vLLM's params, or None), which ``auto`` keeps
        beside the tools' and a forced call replaces."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        choice: Any = {"type": "function", "function": {"name": use.choice}} if use.named else use.choice
        request = ChatCompletionRequest(messages=[], tools=json.loads(use.tools_json), tool_choice=choice,
                                        parallel_tool_calls=use.parallel_tool_calls,
                                        skip_special_tokens=skip_special_tokens,
                                        structured_outputs=structured_outputs)  # fmt: skip
        self._parser = parser_cls(tokenizer, request.tools, model_config=model_config)
        self._request = self._parser.adjust_request(request)
        self._single_call = not use.parallel_tool_calls
        self._named = use.named
        self._called = False
        self._prompt_seen = False

    @property
    def structured_outputs(self):
        """vLLM's ``StructuredOutputsParams`` to sample under: the request's own, and the tools'."""
        return self._request.structured_outputs

    @property
    def skip_special_tokens(self) -> bool:
        """Some formats mark their call delimiters special: their parser keeps them in the text it reads."""
        return self._request.skip_special_tokens

    def read(
        self, text: str, token_ids: Sequence[int], prompt_token_ids: Sequence[int], finish_reason: str | None
    ) -> tuple[str, tuple[ToolCallDelta, ...], str | None]:
        """This step's content, tool-call pieces and finish reason (``tool_calls`` where a call was made and
        not forced by name, as OpenAI's API says)."""
        prompt = None if self._prompt_seen else list(prompt_token_ids)
        self._prompt_seen = True
        try:
            message = self._parser.parse_delta(text, list(token_ids), self._request, prompt,
                                               finished=finish_reason is not None)  # fmt: skip
        except Exception as exc:  # whatever a parser raises on text it did not expect
            raise ToolCallReadError(f"vLLM's tool call parser failed on the output: {exc!r}") from exc
        content, calls = "", ()
        if message is not None:
            content = message.content or ""
            calls = tuple(_piece(call) for call in message.tool_calls if not (self._single_call and call.index > 0))
        self._called = self._called or bool(calls)
        if finish_reason == "stop" and self._called and not self._named:
            finish_reason = "tool_calls"
        return content, calls, finish_reason


def _piece(call) -> ToolCallDelta:
    function = call.function
    return ToolCallDelta(call.index, call.id, function.name if function else None,
                         (function.arguments or "") if function else "")  # fmt: skip
