"""Tool calls read from a chat's output by vLLM's parsers on the engine's side, on the tiny model at the
default dtype: its chat template shows tools as Hermes-format models do, so the engine reads ``hermes``."""

from __future__ import annotations

import json

import pytest
from helpers import collect, whitespace_banned

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineConfigError, EngineInputError
from engine.types import GenerateRequest, SamplingOptions, StructuredOutput, ToolUse
from router.tokenizer import ModelTokenizer

pytestmark = pytest.mark.engine

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                   "required": ["city"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {
    "name": "get_time", "strict": True,
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}  # fmt: skip
TOOLS = json.dumps([WEATHER, TIME])


def engine_config(model_dir, **changes) -> EngineConfig:
    fields = dict(model=model_dir, block_size=32, num_kv_blocks=48, max_model_len=1024, enforce_eager=True)
    return EngineConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = Engine(engine_config(model_dir, tool_call_parser="hermes"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def chat(model_dir) -> list[int]:
    tokenizer = ModelTokenizer(model_dir)
    text = tokenizer.render_chat([{"role": "user", "content": "Weather in Paris?"}], tools=json.loads(TOOLS))
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def steer(model_dir) -> tuple[tuple[int, float], ...]:
    return tuple(whitespace_banned(model_dir).items())


def run(engine, chat, name: str, use: ToolUse | None, **sampling):
    options = SamplingOptions(**{"max_tokens": 80, "temperature": 0.0, "tool_use": use, **sampling})
    return collect(engine, GenerateRequest(name, chat, options))


def calls_of(deltas) -> list[dict]:
    """The streamed pieces joined per call, as a whole response holds them."""
    calls: dict[int, dict] = {}
    for piece in (piece for delta in deltas for piece in delta.tool_calls):
        call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
        call["id"] = call["id"] or piece.id
        call["name"] += piece.name or ""
        call["arguments"] += piece.arguments
    return [calls[index] for index in sorted(calls)]


def test_a_required_call_names_a_tool_with_arguments_its_schema_admits(engine, chat, steer):
    deltas = run(engine, chat, "required", ToolUse(TOOLS, "required"), logit_bias=steer)
    calls = calls_of(deltas)
    assert calls and all(call["id"] for call in calls)
    first = calls[0]
    arguments = json.loads(first["arguments"])
    if first["name"] == "get_weather":
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and len(arguments["city"]) <= 10
    else:
        assert first["name"] == "get_time" and arguments in ({"zone": "UTC"}, {"zone": "CET"})
    assert all(delta.text == "" for delta in deltas)  # a forced call is all call, no content
    assert deltas[-1].finish_reason in ("tool_calls", "length")


def test_a_named_call_calls_that_function_and_finishes_with_stop(engine, chat, steer):
    deltas = run(engine, chat, "named", ToolUse(TOOLS, "get_time", named=True), logit_bias=steer)
    (call,) = calls_of(deltas)
    assert call["name"] == "get_time" and json.loads(call["arguments"]) in ({"zone": "UTC"}, {"zone": "CET"})
    assert deltas[-1].finish_reason == "stop"  # OpenAI's: tool_calls only for a call the model chose


def test_parallel_tool_calls_false_keeps_one_call(engine, chat, steer):
    many = calls_of(run(engine, chat, "parallel", ToolUse(TOOLS, "required"), max_tokens=200, logit_bias=steer))
    single = ToolUse(TOOLS, "required", parallel_tool_calls=False)
    one = calls_of(run(engine, chat, "single", single, max_tokens=200, logit_bias=steer))
    assert len(many) > 1, "the tiny model, left to it, calls more than once"
    assert len(one) == 1 and (one[0]["name"], one[0]["arguments"]) == (many[0]["name"], many[0]["arguments"])


def test_auto_reads_a_hermes_call_out_of_the_text(engine, chat):
    # The random model would never write a call by itself: a regex makes it write one in Hermes' format. (The
    # tools are not strict: strict ones would give the model the choice of a call of its own beside the regex.)
    written = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>'
    loose = json.dumps([{**tool, "function": {**tool["function"], "strict": False}} for tool in (WEATHER, TIME)])
    deltas = run(engine, chat, "auto-call", ToolUse(loose, "auto"), structured=StructuredOutput("regex", written))
    (call,) = calls_of(deltas)
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert "".join(delta.text for delta in deltas) == ""  # the call's markup is not content
    assert deltas[-1].finish_reason == "tool_calls"


def test_auto_without_a_call_is_the_plain_output_as_content(engine, chat):
    plain = run(engine, chat, "no-tools", None, max_tokens=24)
    auto = run(engine, chat, "auto-text", ToolUse(TOOLS, "auto"), max_tokens=24)
    assert [t for d in auto for t in d.token_ids] == [t for d in plain for t in d.token_ids]
    assert "".join(d.text for d in auto) == "".join(d.text for d in plain) and not calls_of(auto)
    assert auto[-1].finish_reason == plain[-1].finish_reason == "length"


def test_a_tool_choice_naming_no_tool_is_refused_naming_it_and_the_engine_serves_on(engine, chat):
    with pytest.raises(EngineInputError, match="tool_choice"):
        run(engine, chat, "nameless", ToolUse(TOOLS, "get_stock", named=True))
    assert run(engine, chat, "after", None, max_tokens=4)[-1].finish_reason == "length"


def test_an_unknown_parser_name_fails_the_start_naming_tool_call_parser(model_dir):
    with pytest.raises(EngineConfigError, match="tool_call_parser"):
        Engine(engine_config(model_dir, tool_call_parser="no_such_format"))
