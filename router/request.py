"""One typed request for both front ends, and the validation that guards it.

Every bad field raises ``RequestError`` naming the field and the limit, before
anything is queued. Field names follow the OpenAI completions/chat API, plus
vLLM's extensions (``top_k``, ``min_p``, ``stop_token_ids``, ``ignore_eos``).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from engine.types import SamplingOptions, StructuredOutput, ToolUse
from router.tokenizer import ModelTokenizer, TokenizerError

Kind = Literal["completion", "chat"]
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_LONE_SURROGATE = "holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text"


class RequestError(ValueError):
    """A request the router refuses: maps to HTTP 400 / gRPC INVALID_ARGUMENT, or a subclass's own status."""

    http_status = 400
    grpc_status = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownModelError(RequestError):
    http_status = 404
    grpc_status = "NOT_FOUND"


class DuplicateRequestError(RequestError):
    """A request id that is already running (on any router replica sharing the registry)."""

    http_status = 409
    grpc_status = "ALREADY_EXISTS"


class BodyTooLargeError(RequestError):
    http_status = 413
    grpc_status = "RESOURCE_EXHAUSTED"


MAX_LOGPROBS = 20  # alternatives per token: vLLM's default max_logprobs


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for; the model's figures come from its directory."""

    context_length: int
    vocab_size: int
    max_body_bytes: int = 1 << 20
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    default_max_tokens: int = 16
    max_choices: int = 16
    auto_tool_choice: bool = False  # the workers read calls from free text (a tool call parser is configured)


@dataclass(frozen=True)
class ChatRendering:
    """How a chat's messages become its prompt: the template controls vLLM's chat API takes."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last message left open, for the model to go on with
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # extra variables for the template
    tools: list[dict[str, Any]] | None = None  # the request's tool definitions, for the template to show the model

    def render(self, messages: list[dict[str, Any]], tokenizer: ModelTokenizer) -> str:
        try:
            return tokenizer.render_chat(
                messages, self.add_generation_prompt, self.continue_final_message, self.template_kwargs, self.tools
            )
        except TokenizerError as exc:
            raise RequestError("messages", str(exc)) from exc


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    kind: Kind
    model: str | None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    chat: ChatRendering = ChatRendering()
    sampling: SamplingOptions = SamplingOptions()
    stream: bool = False
    include_usage: bool = False
    to_end_of_context: bool = False  # a chat without max_tokens: the rest of the context (vLLM's default)
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last N tokens (vLLM's; -1: the context)
    echo: bool = False  # a completion's text (and logprobs) begin with its prompt's


_COMMON = {
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "stop_token_ids", "ignore_eos", "stream", "stream_options", "request_id", "n", "user", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "min_tokens", "logit_bias", "allowed_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "truncate_prompt_tokens", "response_format",
    "structured_outputs", "bad_words", "prompt_logprobs",
}  # fmt: skip
_FIELDS: dict[Kind, set[str]] = {
    "completion": _COMMON | {"prompt", "logprobs", "echo"},
    "chat": _COMMON
    | {
        "messages",
        "logprobs",
        "top_logprobs",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template_kwargs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    },
}


@dataclass(frozen=True)
class FanOut:
    """A request for several sequences (``n`` > 1, or a completion's batch of prompts) as one body per
    sequence, in vLLM's choice order (index = prompt × n + copy): each is a request of its own, placed on
    its own, and copy ``i`` of a seeded request samples with ``seed + i``, as vLLM's parallel sampling does."""

    request_id: str
    bodies: list[dict[str, Any]]
    first_copies: list[bool]  # the first copy of its prompt: its prompt tokens count once in usage

    def shares_prompt_with(self, index: int) -> str | None:
        """The request id of the first copy of sequence ``index``'s prompt (None for a first copy): the later
        copies decode beside it, from its prompt's KV (router/service.py)."""
        first = max(i for i in range(index + 1) if self.first_copies[i])
        return None if first == index else self.bodies[first]["request_id"]


def fan_out(body: bytes, kind: Kind, limits: RequestLimits) -> FanOut:
    data = _decode_body(body, limits)
    n = _get(data, "n", int, 1)
    prompts = [data.get("prompt")]
    if kind == "completion" and isinstance(prompts[0], list) and len(prompts[0]) > 1:
        if isinstance(prompts[0][0], str | list):  # a batch: texts or token-id lists (flat ids are one prompt)
            prompts = prompts[0]
    if n < 1 or n * len(prompts) > limits.max_choices:
        raise RequestError("n", f"must be at least 1, and n × prompts at most {limits.max_choices}, got {n} × "
                           f"{len(prompts)}")  # fmt: skip
    request_id = _get(data, "request_id", str, None) or uuid.uuid4().hex
    if len(prompts) == 1 and n == 1:
        return FanOut(request_id, [{**data, "request_id": request_id}], [True])
    seed = _get(data, "seed", int, None)
    bodies, first_copies = [], []
    for p, prompt in enumerate(prompts):
        for copy in range(n):
            sub = {**data, "n": 1, "request_id": f"{request_id}-{p * n + copy}"}
            if kind == "completion":
                sub["prompt"] = prompt
            if seed is not None:
                sub["seed"] = seed + copy
            bodies.append(sub)
            first_copies.append(copy == 0)
    return FanOut(request_id, bodies, first_copies)


def parse_request(body: bytes | Mapping[str, Any], kind: Kind, limits: RequestLimits) -> GenerationRequest:
    """Validate a raw body (JSON bytes or an already-decoded mapping) into a request."""
    data = _decode_body(body, limits) if isinstance(body, bytes | bytearray) else dict(body)
    unknown = sorted(set(data) - _FIELDS[kind])
    if unknown:
        raise RequestError(unknown[0], f"unknown field (allowed: {', '.join(sorted(_FIELDS[kind]))})")
    if _get(data, "n", int, 1) != 1:
        raise RequestError("n", "one sequence per parsed request: fan_out splits n > 1 first")
    request_id = _get(data, "request_id", str, None) or uuid.uuid4().hex
    if not request_id or len(request_id) > 128:
        raise RequestError("request_id", "must be 1 to 128 characters")
    prompt, prompt_ids, messages, chat = None, None, None, ChatRendering()
    if kind == "completion":
        prompt, prompt_ids = _prompt(data, limits)
    else:
        messages, chat = _messages(data), _chat_rendering(data)
    sampling = _sampling(data, kind, limits)
    if kind == "chat" and (tool_use := _tool_use(data, chat.tools, sampling, limits)) is not None:
        sampling = replace(sampling, tool_use=tool_use)
    stream_options = _get(data, "stream_options", dict, {}) or {}
    return GenerationRequest(
        request_id=request_id,
        kind=kind,
        model=_get(data, "model", str, None),
        prompt=prompt,
        prompt_token_ids=prompt_ids,
        messages=messages,
        chat=chat,
        sampling=sampling,
        stream=_get(data, "stream", bool, False),
        include_usage=bool(stream_options.get("include_usage", False)),
        to_end_of_context=kind == "chat" and _max_tokens_field(data) is None,
        truncate_prompt_tokens=_truncation(data),
        echo=kind == "completion" and _get(data, "echo", bool, False),
    )


@dataclass(frozen=True)
class TokenizeRequest:
    """``POST /tokenize`` (vLLM's shape): a prompt, or a chat rendered as a chat completion renders it."""

    model: str | None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    chat: ChatRendering = ChatRendering()
    add_special_tokens: bool = True  # a chat's default is False: its template writes its own
    return_token_strs: bool = False


_TOKENIZE_FIELDS = {"model", "prompt", "add_special_tokens", "return_token_strs"}
_TOKENIZE_CHAT_FIELDS = {
    "model", "messages", "add_special_tokens", "return_token_strs", "add_generation_prompt", "continue_final_message",
    "chat_template_kwargs", "tools",
}  # fmt: skip


def parse_tokenize_request(body: bytes, limits: RequestLimits) -> TokenizeRequest:
    data = _decode_body(body, limits)
    chat = "messages" in data
    allowed = _TOKENIZE_CHAT_FIELDS if chat else _TOKENIZE_FIELDS
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RequestError(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")
    model, token_strs = _get(data, "model", str, None), _get(data, "return_token_strs", bool, False)
    if not chat:
        prompt = _get(data, "prompt", str, None)
        if prompt is None:
            raise RequestError("prompt", "is required (or messages, for a chat)")
        if not _is_unicode(prompt):
            raise RequestError("prompt", _LONE_SURROGATE)
        add_special_tokens = _get(data, "add_special_tokens", bool, True)
        return TokenizeRequest(model, prompt, add_special_tokens=add_special_tokens, return_token_strs=token_strs)
    return TokenizeRequest(
        model, None, _messages(data), _chat_rendering(data), _get(data, "add_special_tokens", bool, False), token_strs
    )


def tokenize_only(request: TokenizeRequest, tokenizer: ModelTokenizer) -> list[int]:
    """The ids ``/tokenize`` answers: the prompt's, or the rendered chat's, as generation would compute them."""
    if request.messages is None:
        return tokenizer.encode(request.prompt or "", request.add_special_tokens)
    return tokenizer.encode(request.chat.render(request.messages, tokenizer), request.add_special_tokens)


def parse_detokenize_request(body: bytes, limits: RequestLimits) -> tuple[str | None, list[int]]:
    """``POST /detokenize`` (vLLM's shape): the model named, and token ids inside the vocabulary."""
    data = _decode_body(body, limits)
    unknown = sorted(set(data) - {"model", "tokens"})
    if unknown:
        raise RequestError(unknown[0], "unknown field (allowed: model, tokens)")
    tokens = _get(data, "tokens", list, None)
    if tokens is None:
        raise RequestError("tokens", "is required")
    return _get(data, "model", str, None), _token_ids("tokens", tokens, limits)


def tokenize(request: GenerationRequest, tokenizer: ModelTokenizer, limits: RequestLimits) -> list[int]:
    """The prompt's token ids, checked against the vocabulary and the context length."""
    if request.prompt_token_ids is not None:
        ids = request.prompt_token_ids
    else:
        text = (
            request.prompt if request.kind == "completion" else request.chat.render(request.messages or [], tokenizer)
        )
        if not _is_unicode(text or ""):
            raise RequestError("prompt", _LONE_SURROGATE)
        ids = tokenizer.encode(text or "", add_special_tokens=request.kind == "completion")
    if not ids:
        raise RequestError("prompt", "must not be empty")
    if request.truncate_prompt_tokens is not None:
        keep = limits.context_length if request.truncate_prompt_tokens == -1 else request.truncate_prompt_tokens
        ids = ids[-keep:]
    if request.to_end_of_context:
        if len(ids) >= limits.context_length:
            room = f"leaves no room in the context length {limits.context_length}"
            raise RequestError("messages", f"the prompt ({len(ids)} tokens) {room}")
        return ids
    total = len(ids) + request.sampling.max_tokens
    if total > limits.context_length:
        raise RequestError(
            "max_tokens",
            f"prompt ({len(ids)} tokens) + max_tokens ({request.sampling.max_tokens}) = {total} exceeds "
            f"the model's context length {limits.context_length}",
        )
    return ids


def fit_to_context(request: GenerationRequest, prompt_tokens: int, limits: RequestLimits) -> GenerationRequest:
    """A chat without ``max_tokens`` may generate up to the end of the context, as vLLM's server allows."""
    if not request.to_end_of_context:
        return request
    sampling = replace(request.sampling, max_tokens=limits.context_length - prompt_tokens)
    return replace(request, sampling=sampling, to_end_of_context=False)


def _is_unicode(text: str) -> bool:
    """JSON's ``\\udXXX`` escapes can leave a lone surrogate, which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode_body(body: bytes, limits: RequestLimits) -> dict[str, Any]:
    if len(body) > limits.max_body_bytes:
        raise BodyTooLargeError("body", f"{len(body)} bytes exceeds the limit of {limits.max_body_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("body", f"is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError("body", f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise RequestError("body", "is nested too deeply to parse") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise RequestError("body", f"is not JSON this server can read: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("body", "must be a JSON object")
    return data


def _get(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a JSON true must not pass as a number.
    if isinstance(value, bool) and bool not in kinds:
        raise RequestError(name, f"must be {_type_name(kinds)}, got a boolean")
    if float in kinds and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kinds):
        raise RequestError(name, f"must be {_type_name(kinds)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(name, "must be a finite number")
    return value


def _type_name(kinds: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "a boolean",
        list: "a list",
        dict: "an object",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _prompt(data: Mapping[str, Any], limits: RequestLimits) -> tuple[str | None, list[int] | None]:
    prompt = data.get("prompt")
    if prompt is None:
        raise RequestError("prompt", "is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # OpenAI clients send a one-element batch
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt", "must not be empty")
        return prompt, None
    if isinstance(prompt, list):
        if not prompt:
            raise RequestError("prompt", "must not be empty")
        return None, _token_ids("prompt", prompt, limits)
    raise RequestError("prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}")


def _token_ids(field: str, values: list, limits: RequestLimits) -> list[int]:
    for token in values:
        if isinstance(token, bool) or not isinstance(token, int):
            raise RequestError(field, "token ids must be integers")
        if not 0 <= token < limits.vocab_size:
            raise RequestError(field, f"token id {token} is outside the vocabulary [0, {limits.vocab_size})")
    return list(values)


_TEMPLATE_VARIABLES = {"messages", "add_generation_prompt", "bos_token", "eos_token", "tools"}  # set by pdserve


def _chat_rendering(data: Mapping[str, Any]) -> ChatRendering:
    """A chat's template controls; ``continue_final_message`` turns the generation prompt off unless it is asked
    for too, which is refused (vLLM refuses the pair; transformers cannot render it)."""
    continue_final = _get(data, "continue_final_message", bool, False)
    add_generation_prompt = _get(data, "add_generation_prompt", bool, not continue_final)
    if continue_final and add_generation_prompt:
        raise RequestError("continue_final_message", "cannot be true with add_generation_prompt: true")
    template_kwargs = _get(data, "chat_template_kwargs", dict, {})
    if taken := sorted(set(template_kwargs) & _TEMPLATE_VARIABLES):
        raise RequestError("chat_template_kwargs", f"may not set {taken[0]!r}: pdserve sets it")
    return ChatRendering(add_generation_prompt, continue_final, dict(template_kwargs), _tools(data))


_MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id"}
# An OpenAI client's reply object sent back as history carries these, empty: taken then, refused with content.
_EMPTY_IN_REPLIES = {"refusal", "annotations", "audio", "function_call", "reasoning", "reasoning_content"}


def _messages(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat as its template takes it: text content, and an assistant's tool calls with their arguments as
    objects (JSON text in OpenAI's API), as vLLM and transformers hand them to chat templates."""
    messages = _get(data, "messages", list, None)
    if not messages:
        raise RequestError("messages", "must be a non-empty list")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(where, "must be an object with role and content")
        carried = {
            name for name, value in message.items() if name not in _EMPTY_IN_REPLIES or value not in (None, "", [])
        }
        if unknown := sorted(carried - _MESSAGE_FIELDS):
            allowed = ", ".join(sorted(_MESSAGE_FIELDS))
            raise RequestError(
                f"{where}.{unknown[0]}", f"unknown field, or one pdserve does not take (allowed: {allowed})"
            )
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise RequestError(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        tool_calls = _message_tool_calls(message, where) if role == "assistant" else None
        if message.get("tool_calls") is not None and tool_calls is None:
            raise RequestError(f"{where}.tool_calls", "only an assistant message makes tool calls")
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise RequestError(f"{where}.content", "only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not (isinstance(content, str) or content is None and tool_calls):
            raise RequestError(f"{where}.content", f"must be a string, got {type(content).__name__}")
        if not _is_unicode(content or ""):
            raise RequestError(f"{where}.content", _LONE_SURROGATE)
        entry: dict[str, Any] = {"role": role, "content": content}
        for name in ("name", "tool_call_id"):
            if (value := message.get(name)) is not None:
                if not isinstance(value, str) or not value:
                    raise RequestError(f"{where}.{name}", "must be a non-empty string")
                entry[name] = value
        if role == "tool" and "tool_call_id" not in entry:
            raise RequestError(f"{where}.tool_call_id", "a tool message names the call it answers")
        if tool_calls:
            entry["tool_calls"] = tool_calls
        clean.append(entry)
    return clean


def _message_tool_calls(message: Mapping[str, Any], where: str) -> list[dict[str, Any]] | None:
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls", "must be a list of tool calls")
    clean = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(at, 'must be {"id", "type": "function", "function": {"name": ..., "arguments": ...}}')
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise RequestError(f"{at}.function.arguments", "is not JSON text") from None
        if not isinstance(arguments, dict | None):
            raise RequestError(f"{at}.function.arguments", "must be a JSON object")
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments or {}}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        clean.append(entry)
    return clean


def _tools(data: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """OpenAI's function tools (``{"type": "function", "function": {"name", "description", "parameters"}}``)."""
    tools = _get(data, "tools", list, None)
    if tools is None:
        return None
    if not tools:
        raise RequestError("tools", "must not be empty (leave it out for no tools)")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise RequestError(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., ...}}')
        name = function.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise RequestError(f"tools[{i}].function.name", "must be a non-empty string, different for each tool")
        names.add(name)
        if not isinstance(function.get("parameters", {}), dict | None):
            raise RequestError(f"tools[{i}].function.parameters", "must be a JSON schema object")
        if not isinstance(function.get("description", ""), str | None):
            raise RequestError(f"tools[{i}].function.description", "must be a string")
    return [{**tool, "type": "function"} for tool in tools]


def _tool_use(
    data: Mapping[str, Any], tools: list[dict[str, Any]] | None, sampling: SamplingOptions, limits: RequestLimits
) -> ToolUse | None:
    """How the worker reads the output for calls: ``tool_choice`` (``auto`` where tools are given, as in vLLM),
    refused where no tool can be called or the service cannot read free-text calls."""
    choice = data.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    named = isinstance(choice, dict)
    if named:
        function = choice.get("function")
        if choice.get("type", "function") != "function" or not isinstance(function, dict):
            raise RequestError("tool_choice", 'a named tool is {"type": "function", "function": {"name": ...}}')
        choice = function.get("name")
        if not any(tool["function"]["name"] == choice for tool in tools or ()):
            raise RequestError("tool_choice", f"names {choice!r}, which is not one of the tools")
    elif choice not in ("none", "auto", "required"):
        raise RequestError("tool_choice", f'must be "none", "auto", "required" or a named function, got {choice!r}')
    parallel = _get(data, "parallel_tool_calls", bool, True)
    if choice == "none":
        if "parallel_tool_calls" in data and not tools:
            raise RequestError("parallel_tool_calls", "needs tools")
        return None
    if not tools:
        raise RequestError("tool_choice", "needs tools")
    if choice == "auto" and not limits.auto_tool_choice:
        raise RequestError("tool_choice", '"auto" needs a tool call parser for the model (engine.tool_call_parser, '
                           "vLLM's --tool-call-parser); required and a named function work without one")  # fmt: skip
    if (named or choice == "required") and sampling.structured is not None:
        raise RequestError("tool_choice", "a forced tool call sets the output's format: drop response_format / "
                           "structured_outputs")  # fmt: skip
    return ToolUse(json.dumps(tools), choice, named, parallel)


def _sampling(data: Mapping[str, Any], kind: Kind, limits: RequestLimits) -> SamplingOptions:
    max_tokens_field = _max_tokens_field(data) or "max_tokens"
    max_tokens = _get(data, max_tokens_field, int, limits.default_max_tokens)
    if max_tokens < 1:
        raise RequestError(max_tokens_field, f"must be at least 1, got {max_tokens}")
    if max_tokens >= limits.context_length:
        raise RequestError(max_tokens_field, f"must be below the context length {limits.context_length}")
    temperature = _get(data, "temperature", float, 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise RequestError("temperature", f"must be in [0, 2], got {temperature}")
    top_p = _get(data, "top_p", float, 1.0)
    if not 0.0 < top_p <= 1.0:
        raise RequestError("top_p", f"must be in (0, 1], got {top_p}")
    top_k = _get(data, "top_k", int, -1)
    if top_k < -1 or top_k == 0:
        raise RequestError("top_k", f"must be -1 (off) or at least 1, got {top_k}")
    min_p = _get(data, "min_p", float, 0.0)
    if not 0.0 <= min_p <= 1.0:
        raise RequestError("min_p", f"must be in [0, 1], got {min_p}")
    penalties = {name: _get(data, name, float, 0.0) for name in ("presence_penalty", "frequency_penalty")}
    for name, value in penalties.items():
        if not -2.0 <= value <= 2.0:
            raise RequestError(name, f"must be in [-2, 2], got {value}")
    repetition_penalty = _get(data, "repetition_penalty", float, 1.0)
    if not repetition_penalty > 0.0:
        raise RequestError("repetition_penalty", f"must be above 0 (1 is off), got {repetition_penalty}")
    seed = _get(data, "seed", int, None)
    stop = _stop_strings(data, limits)
    stop_token_ids = _get(data, "stop_token_ids", list, [])
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise RequestError("stop_token_ids", f"at most {limits.max_stop_token_ids} entries")
    for token in stop_token_ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < limits.vocab_size:
            raise RequestError("stop_token_ids", f"entries must be token ids in [0, {limits.vocab_size})")
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        stop=stop,
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=_get(data, "ignore_eos", bool, False),
        repetition_penalty=repetition_penalty,
        min_tokens=_min_tokens(data, max_tokens),
        logit_bias=_logit_bias(data, limits),
        allowed_token_ids=_allowed_token_ids(data, limits),
        include_stop_str_in_output=_get(data, "include_stop_str_in_output", bool, False),
        skip_special_tokens=_get(data, "skip_special_tokens", bool, True),
        logprobs=_logprobs(data, kind),
        structured=_structured(data),
        bad_words=_bad_words(data, limits),
        prompt_logprobs=_prompt_logprobs(data, kind),
        **penalties,
    )


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _structured(data: Mapping[str, Any]) -> StructuredOutput | None:
    """OpenAI's ``response_format`` or vLLM's ``structured_outputs`` (one constraint), never both."""
    response_format = _get(data, "response_format", dict, None)
    asked = _get(data, "structured_outputs", dict, None)
    if response_format is not None and asked is not None:
        raise RequestError("structured_outputs", "give response_format or structured_outputs, not both")
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutput("json_object")
        if kind != "json_schema":
            raise RequestError("response_format", f"type must be text, json_object or json_schema, got {kind!r}")
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise RequestError("response_format", "json_schema.schema must be a JSON schema object")
        return StructuredOutput("json", json.dumps(schema))
    if asked is None:
        return None
    unknown = sorted(set(asked) - set(_CONSTRAINTS))
    given = [name for name in _CONSTRAINTS if asked.get(name) not in (None, False)]
    if unknown or len(given) != 1:
        # disable_any_whitespace and the like: vLLM 0.32 reads them from the engine's config, not the request
        raise RequestError("structured_outputs", f"must hold exactly one of {', '.join(_CONSTRAINTS)} and nothing else")
    (kind,) = given
    spec = asked[kind]
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json":
        schema = spec
        if isinstance(spec, str):
            try:
                schema = json.loads(spec)
            except ValueError:
                raise RequestError("structured_outputs", "json is a string that is not JSON") from None
        if not isinstance(schema, dict):
            raise RequestError("structured_outputs", "json must be a JSON schema object")
        return StructuredOutput("json", json.dumps(schema))
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise RequestError("structured_outputs", "choice must be a non-empty list of non-empty strings")
        return StructuredOutput("choice", tuple(spec))
    if not isinstance(spec, str) or not spec:
        raise RequestError("structured_outputs", f"{kind} must be a non-empty string")
    return StructuredOutput(kind, spec)


def _prompt_logprobs(data: Mapping[str, Any], kind: Kind) -> int | None:
    """vLLM's ``prompt_logprobs: N``; an echoed completion asking for logprobs gets them for its prompt too."""
    top = _get(data, "prompt_logprobs", int, None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise RequestError("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {top}")
    if kind == "completion" and _get(data, "echo", bool, False) and (logprobs := _logprobs(data, kind)) is not None:
        top = max(top or 0, logprobs)
    if top is not None and _get(data, "stream", bool, False):
        field = "prompt_logprobs" if "prompt_logprobs" in data else "echo"
        raise RequestError(field, "prompt logprobs are not available when streaming (as in vLLM)")
    return top


def _bad_words(data: Mapping[str, Any], limits: RequestLimits) -> tuple[str, ...]:
    words = _get(data, "bad_words", list, [])
    if len(words) > limits.max_stop_strings:
        raise RequestError("bad_words", f"at most {limits.max_stop_strings} words, got {len(words)}")
    for word in words:
        if not isinstance(word, str) or not word.strip() or not _is_unicode(word):
            raise RequestError("bad_words", "entries must be non-empty strings")
    return tuple(words)


def _min_tokens(data: Mapping[str, Any], max_tokens: int) -> int:
    min_tokens = _get(data, "min_tokens", int, 0)
    if not 0 <= min_tokens <= max_tokens:
        raise RequestError("min_tokens", f"must be in [0, max_tokens = {max_tokens}], got {min_tokens}")
    return min_tokens


def _logit_bias(data: Mapping[str, Any], limits: RequestLimits) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"<token id>": bias}``, each bias in [-100, 100]."""
    biases = _get(data, "logit_bias", dict, {})
    clean = []
    for key, bias in biases.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError("logit_bias", f"keys must be token ids, got {key!r}") from None
        if not 0 <= token < limits.vocab_size:
            raise RequestError("logit_bias", f"token id {token} is outside the vocabulary [0, {limits.vocab_size})")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise RequestError("logit_bias", f"biases must be numbers in [-100, 100], got {bias!r} for {key}")
        clean.append((token, float(bias)))
    return tuple(clean)


def _allowed_token_ids(data: Mapping[str, Any], limits: RequestLimits) -> tuple[int, ...] | None:
    allowed = _get(data, "allowed_token_ids", list, None)
    if allowed is None:
        return None
    if not allowed:
        raise RequestError("allowed_token_ids", "must not be empty (leave it out to allow every token)")
    for token in allowed:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < limits.vocab_size:
            raise RequestError("allowed_token_ids", f"entries must be token ids in [0, {limits.vocab_size})")
    return tuple(allowed)


def _truncation(data: Mapping[str, Any]) -> int | None:
    keep = _get(data, "truncate_prompt_tokens", int, None)
    if keep is not None and keep < 1 and keep != -1:
        raise RequestError("truncate_prompt_tokens", f"must be at least 1, or -1 (the context length), got {keep}")
    return keep


def _max_tokens_field(data: Mapping[str, Any]) -> str | None:
    """The field that sets the output length (``max_completion_tokens`` wins), or None when neither does."""
    for name in ("max_completion_tokens", "max_tokens"):
        if data.get(name) is not None:
            return name
    return None


def _stop_strings(data: Mapping[str, Any], limits: RequestLimits) -> tuple[str, ...]:
    stop = _get(data, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > limits.max_stop_strings:
        raise RequestError("stop", f"at most {limits.max_stop_strings} stop strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise RequestError("stop", "entries must be non-empty strings")
        if len(s) > limits.max_stop_string_chars:
            raise RequestError("stop", f"entries must be at most {limits.max_stop_string_chars} characters")
        if not _is_unicode(s):
            raise RequestError("stop", _LONE_SURROGATE)
    return tuple(stop)


def _logprobs(data: Mapping[str, Any], kind: Kind) -> int | None:
    """The alternatives asked for per output token (None: no logprobs): a completion's ``logprobs: N``,
    a chat's ``logprobs: true`` with ``top_logprobs: N``; N at most vLLM's default ``max_logprobs``."""
    if kind == "completion":
        top, field = _get(data, "logprobs", int, None), "logprobs"
    else:
        top, field = _get(data, "top_logprobs", int, None), "top_logprobs"
        if not _get(data, "logprobs", bool, False):
            if top:
                raise RequestError("top_logprobs", "needs logprobs: true")
            return None
        top = top or 0
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise RequestError(field, f"must be in [0, {MAX_LOGPROBS}], got {top}")
    return top
