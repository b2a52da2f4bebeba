"""Request validation and tokenization in the router: every bad field is named with its limit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.types import StructuredOutput
from router.request import RequestError, RequestLimits, fan_out, fit_to_context, parse_request, tokenize
from router.tokenizer import ModelTokenizer

LIMITS = RequestLimits(context_length=512, vocab_size=1024, max_body_bytes=4096, max_stop_strings=4)


@pytest.fixture(scope="module")
def tokenizer(make_tiny_model):
    return ModelTokenizer(make_tiny_model("llama"))


def completion(**fields):
    return parse_request({"prompt": "hello", **fields}, "completion", LIMITS)


def test_a_completion_with_every_sampling_field_parses():
    request = completion(
        model="tiny", max_tokens=5, temperature=0.5, top_p=0.9, top_k=40, min_p=0.1, seed=7, stop=["\n"],
        stop_token_ids=[1], stream=True, stream_options={"include_usage": True}, request_id="r-1",
        presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
    )  # fmt: skip
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (5, 0.5, 0.9, 40, 0.1, 7)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, 1.2)
    assert (s.stop, s.stop_token_ids) == (("\n",), (1,))
    assert request.stream and request.include_usage and request.request_id == "r-1"


def test_json_bytes_parse_like_a_mapping():
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 3}).encode()
    request = parse_request(body, "completion", LIMITS)
    assert request.prompt_token_ids == [5, 6, 7] and request.sampling.max_tokens == 3


def test_a_request_id_is_made_when_none_is_given():
    assert len(completion().request_id) == 32


def test_chat_messages_render_through_the_model_template(tokenizer):
    request = parse_request({"messages": [{"role": "user", "content": "hi"}]}, "chat", LIMITS)
    ids = tokenize(request, tokenizer, LIMITS)
    assert tokenizer.decode(ids) == "<|user|>\nhi\n<|assistant|>\n"  # </s> is special: not decoded
    assert ids == tokenizer.encode("<|user|>\nhi</s>\n<|assistant|>\n")


def test_chat_content_parts_are_joined(tokenizer):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = parse_request({"messages": [{"role": "user", "content": parts}]}, "chat", LIMITS)
    assert request.messages == [{"role": "user", "content": "ab"}]


def test_router_tokenization_equals_the_engine_tokenizer(tokenizer, make_tiny_model):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(make_tiny_model("llama"))
    for text in ["Hello, world!", "naïve café 東京 🙂", "  spaces\tand\nnewlines  "]:
        assert tokenizer.encode(text) == reference.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vllms_sampling_extensions_parse_into_the_engines_options():
    s = completion(
        max_tokens=8, min_tokens=3, logit_bias={"5": -100, "7": 2.5}, allowed_token_ids=[5, 7, 9],
        include_stop_str_in_output=True, skip_special_tokens=False,
    ).sampling  # fmt: skip
    assert (s.min_tokens, s.logit_bias, s.allowed_token_ids) == (3, ((5, -100.0), (7, 2.5)), (5, 7, 9))
    assert s.include_stop_str_in_output and not s.skip_special_tokens


def test_truncate_prompt_tokens_keeps_the_last_tokens_of_the_prompt(tokenizer):
    ids = tokenize(completion(prompt=list(range(2, 42)), truncate_prompt_tokens=10), tokenizer, LIMITS)
    assert ids == list(range(32, 42))
    assert tokenize(completion(prompt=[5, 6], truncate_prompt_tokens=-1), tokenizer, LIMITS) == [5, 6]


def test_response_format_and_structured_outputs_become_one_constraint_for_the_engine():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    as_openai = completion(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert as_openai.sampling.structured == StructuredOutput("json", json.dumps(schema))
    assert completion(response_format={"type": "text"}).sampling.structured is None
    assert completion(response_format={"type": "json_object"}).sampling.structured == StructuredOutput("json_object")
    choice = completion(structured_outputs={"choice": ["y", "n"]}).sampling.structured
    assert choice == StructuredOutput("choice", ("y", "n"))
    assert completion(structured_outputs={"json": json.dumps(schema)}).sampling.structured.spec == json.dumps(schema)


def test_n_copies_of_a_seeded_request_sample_with_seed_plus_their_index():
    split = fan_out(json.dumps({"prompt": "x", "n": 3, "seed": 7, "request_id": "r"}).encode(), "completion", LIMITS)
    assert [(b["seed"], b["request_id"], b["n"]) for b in split.bodies] == [(7, "r-0", 1), (8, "r-1", 1), (9, "r-2", 1)]
    assert split.request_id == "r" and split.first_copies == [True, False, False]


def test_a_batch_of_prompts_fans_out_in_vllms_choice_order():
    body = {"prompt": ["a", "b"], "n": 2}
    split = fan_out(json.dumps(body).encode(), "completion", LIMITS)
    assert [b["prompt"] for b in split.bodies] == ["a", "a", "b", "b"] and split.first_copies == [True, False] * 2
    assert [b["request_id"][-2:] for b in split.bodies] == ["-0", "-1", "-2", "-3"]
    ids = [b["request_id"] for b in split.bodies]
    assert [split.shares_prompt_with(i) for i in range(4)] == [None, ids[0], None, ids[2]]  # later copies: the first
    flat = fan_out(json.dumps({"prompt": [5, 6, 7]}).encode(), "completion", LIMITS)
    assert [b["prompt"] for b in flat.bodies] == [[5, 6, 7]]  # token ids: one prompt


def test_more_sequences_than_the_limit_are_refused():
    with pytest.raises(RequestError, match="at most 16") as info:
        fan_out(json.dumps({"prompt": ["a", "b", "c"], "n": 6}).encode(), "completion", LIMITS)
    assert info.value.field == "n"


BAD = [
    ("body", b"\xff\xfe{}", "not valid UTF-8"),
    ("body", b'{"prompt": "x",', "not valid JSON"),
    ("body", b'["prompt"]', "must be a JSON object"),
    ("body", b'{"prompt": "' + b"x" * 5000 + b'"}', "exceeds the limit of 4096 bytes"),
    ("prompt", {"prompt": ""}, "must not be empty"),
    ("prompt", {"prompt": []}, "must not be empty"),
    ("prompt", {}, "is required"),
    ("prompt", {"prompt": 5}, "must be a string or a list of token ids"),
    ("prompt", {"prompt": [1, 2, 5000]}, r"token id 5000 is outside the vocabulary \[0, 1024\)"),
    ("prompt", {"prompt": [1, -3]}, "outside the vocabulary"),
    ("prompt", {"prompt": [1, "a"]}, "token ids must be integers"),
    ("max_tokens", {"prompt": "x", "max_tokens": 0}, "must be at least 1, got 0"),
    ("max_tokens", {"prompt": "x", "max_tokens": -5}, "must be at least 1"),
    ("max_tokens", {"prompt": "x", "max_tokens": 10**9}, "below the context length 512"),
    ("max_tokens", {"prompt": "x", "max_tokens": "5"}, "must be an integer, got str"),
    ("max_tokens", {"prompt": "x", "max_tokens": True}, "got a boolean"),
    ("temperature", {"prompt": "x", "temperature": -0.1}, r"must be in \[0, 2\]"),
    ("temperature", {"prompt": "x", "temperature": float("nan")}, "finite"),
    ("top_p", {"prompt": "x", "top_p": 0}, r"must be in \(0, 1\]"),
    ("top_p", {"prompt": "x", "top_p": 1.5}, r"must be in \(0, 1\]"),
    ("top_k", {"prompt": "x", "top_k": -2}, "must be -1"),
    ("min_p", {"prompt": "x", "min_p": 2}, r"must be in \[0, 1\]"),
    ("stop", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings, got 5"),
    ("stop", {"prompt": "x", "stop": [""]}, "non-empty strings"),
    ("stop", {"prompt": "x", "stop": [3]}, "non-empty strings"),
    ("stop_token_ids", {"prompt": "x", "stop_token_ids": [4096]}, "token ids in"),
    ("logprobs", {"prompt": "x", "logprobs": 21}, r"must be in \[0, 20\], got 21"),
    ("logprobs", {"prompt": "x", "logprobs": True}, "must be an integer"),
    ("n", {"prompt": "x", "n": 3}, "fan_out splits n > 1 first"),
    ("presence_penalty", {"prompt": "x", "presence_penalty": 2.5}, r"must be in \[-2, 2\]"),
    ("frequency_penalty", {"prompt": "x", "frequency_penalty": -3}, r"must be in \[-2, 2\]"),
    ("repetition_penalty", {"prompt": "x", "repetition_penalty": 0}, "must be above 0"),
    ("best_of", {"prompt": "x", "best_of": 2}, "unknown field"),
    ("request_id", {"prompt": "x", "request_id": "r" * 200}, "1 to 128 characters"),
    ("min_tokens", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, r"must be in \[0, max_tokens = 4\]"),
    ("min_tokens", {"prompt": "x", "min_tokens": -1}, "must be in"),
    ("logit_bias", {"prompt": "x", "logit_bias": {"a": 1}}, "keys must be token ids"),
    ("logit_bias", {"prompt": "x", "logit_bias": {"4096": 1}}, "outside the vocabulary"),
    ("logit_bias", {"prompt": "x", "logit_bias": {"5": 101}}, r"in \[-100, 100\]"),
    ("logit_bias", {"prompt": "x", "logit_bias": [5]}, "must be an object"),
    ("allowed_token_ids", {"prompt": "x", "allowed_token_ids": []}, "must not be empty"),
    ("allowed_token_ids", {"prompt": "x", "allowed_token_ids": [5000]}, "token ids in"),
    ("include_stop_str_in_output", {"prompt": "x", "include_stop_str_in_output": 1}, "must be a boolean"),
    ("skip_special_tokens", {"prompt": "x", "skip_special_tokens": "no"}, "must be a boolean"),
    ("truncate_prompt_tokens", {"prompt": "x", "truncate_prompt_tokens": 0}, "at least 1, or -1"),
    ("bad_words", {"prompt": "x", "bad_words": [""]}, "non-empty strings"),
    ("bad_words", {"prompt": "x", "bad_words": "word"}, "must be a list"),
    ("response_format", {"prompt": "x", "response_format": {"type": "yaml"}}, "type must be text, json_object"),
    ("response_format", {"prompt": "x", "response_format": {"type": "json_schema"}}, "schema must be"),
    ("structured_outputs", {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ("structured_outputs", {"prompt": "x", "structured_outputs": {"json": "{nope"}}, "not JSON"),
    ("structured_outputs", {"prompt": "x", "structured_outputs": {"choice": []}}, "non-empty list"),
    (
        "structured_outputs",
        {"prompt": "x", "structured_outputs": {"json": {}, "disable_any_whitespace": True}},
        "nothing else",
    ),
    (
        "structured_outputs",
        {"prompt": "x", "structured_outputs": {"regex": "a"}, "response_format": {"type": "text"}},
        "not both",
    ),
]


@pytest.mark.parametrize("field,body,message", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_bad_completion_fields_are_named_with_their_limit(field, body, message):
    with pytest.raises(RequestError, match=message) as info:
        parse_request(body, "completion", LIMITS)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


BAD_CHAT = [
    ("messages", {}, "non-empty list"),
    ("messages", {"messages": []}, "non-empty list"),
    ("messages[0]", {"messages": ["hi"]}, "object with role and content"),
    ("messages[0].role", {"messages": [{"role": "wizard", "content": "x"}]}, "must be one of system, developer, user"),
    ("messages[1].content", {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": 3}]}, "string"),
    ("messages[0].content", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ("logprobs", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "must be a boolean"),
    ("top_logprobs", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "needs logprobs: true"),
    (
        "top_logprobs",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30},
        r"must be in \[0, 20\]",
    ),
    ("prompt", {"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "unknown field"),
]


@pytest.mark.parametrize("field,body,message", BAD_CHAT, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_CHAT)])
def test_bad_chat_fields_are_named_with_their_limit(field, body, message):
    with pytest.raises(RequestError, match=message) as info:
        parse_request(body, "chat", LIMITS)
    assert info.value.field == field


def test_prompt_plus_max_tokens_over_the_context_is_refused(tokenizer):
    request = completion(prompt=list(range(2, 502)), max_tokens=20)
    with pytest.raises(RequestError, match=r"prompt \(500 tokens\) \+ max_tokens \(20\) = 520 exceeds .* 512"):
        tokenize(request, tokenizer, LIMITS)


def test_a_text_prompt_is_tokenized_with_the_model_tokenizer(tokenizer):
    request = completion(prompt="hello world")
    assert tokenize(request, tokenizer, LIMITS) == tokenizer.encode("hello world")


def test_the_router_never_imports_torch_or_vllm():
    code = (
        "import sys; import router.request, router.tokenizer, router.placement, router.index; "
        "import router.index.redis_index; print('torch' in sys.modules, 'vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
        b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        b'\xef\xbb\xbf{"prompt": "hi"}',
        b'{"prompt": "hi", "stop": "\\udc00"}',
    ],
    ids=["nested-array", "nested-object", "5000-digit-int", "byte-order-mark", "lone-surrogate-stop"],
)
def test_a_body_the_json_parser_cannot_take_is_a_400_request_error(body):
    with pytest.raises(RequestError) as error:
        parse_request(body, "completion", RequestLimits(context_length=512, vocab_size=1024))
    assert error.value.http_status == 400


def test_a_prompt_with_a_lone_surrogate_is_refused_before_the_tokenizer(tokenizer):
    for kind, body in (("completion", b'{"prompt": "\\ud800 hi"}'),
                       ("chat", b'{"messages": [{"role": "user", "content": "hi \\udfff"}]}')):  # fmt: skip
        with pytest.raises(RequestError, match="lone surrogate"):
            tokenize(parse_request(body, kind, LIMITS), tokenizer, LIMITS)


def test_a_chat_template_that_writes_bos_gets_one_bos_where_the_tokenizer_adds_it_too(make_tiny_model, tmp_path):
    """Llama-2 / Mistral style: ``add_bos_token`` and ``{{ bos_token }}`` in the template. A completion gets
    the tokenizer's BOS; a rendered chat is encoded without it, as vLLM and transformers do."""
    source = make_tiny_model("llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((source / name).read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = "{{ bos_token }}" + config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True,
                                                                "chat_template": template}))  # fmt: skip
    bos_adding = ModelTokenizer(tmp_path)
    bos = bos_adding.encode("", add_special_tokens=True)
    assert len(bos) == 1
    chat = parse_request({"messages": [{"role": "user", "content": "hi"}]}, "chat", LIMITS)
    assert tokenize(chat, bos_adding, LIMITS).count(bos[0]) == 1
    assert tokenize(completion(), bos_adding, LIMITS)[0] == bos[0]


def test_a_chat_without_max_tokens_may_generate_to_the_end_of_the_context(tokenizer):
    chat = parse_request({"messages": [{"role": "user", "content": "hi"}]}, "chat", LIMITS)
    ids = tokenize(chat, tokenizer, LIMITS)
    assert fit_to_context(chat, len(ids), LIMITS).sampling.max_tokens == LIMITS.context_length - len(ids)


def test_a_chat_with_max_completion_tokens_keeps_it_and_a_completion_keeps_its_default(tokenizer):
    chat = parse_request({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7}, "chat", LIMITS)
    assert fit_to_context(chat, len(tokenize(chat, tokenizer, LIMITS)), LIMITS).sampling.max_tokens == 7
    assert fit_to_context(completion(), 3, LIMITS).sampling.max_tokens == LIMITS.default_max_tokens


def test_a_chat_prompt_that_fills_the_context_is_refused_naming_messages(tokenizer):
    long = " ".join(["word"] * 2000)
    chat = parse_request({"messages": [{"role": "user", "content": long}]}, "chat", LIMITS)
    with pytest.raises(RequestError, match="leaves no room") as error:
        tokenize(chat, tokenizer, LIMITS)
    assert error.value.field == "messages"


def test_logprobs_asked_for_set_the_alternatives_per_token_and_turned_off_set_none():
    chat = [{"role": "user", "content": "x"}]
    assert (
        parse_request({"messages": chat, "logprobs": False, "top_logprobs": 0}, "chat", LIMITS).sampling.logprobs
        is None
    )
    assert parse_request({"messages": chat, "logprobs": True}, "chat", LIMITS).sampling.logprobs == 0
    assert parse_request({"messages": chat, "logprobs": True, "top_logprobs": 5}, "chat", LIMITS).sampling.logprobs == 5
    assert completion(logprobs=None).sampling.logprobs is None and completion(logprobs=3).sampling.logprobs == 3


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
PARSER = RequestLimits(context_length=512, vocab_size=1024, max_body_bytes=4096, auto_tool_choice=True)


def chat_with(limits=PARSER, **fields):
    return parse_request({"messages": [{"role": "user", "content": "hi"}], **fields}, "chat", limits)


def test_tools_without_a_tool_choice_are_auto_as_in_vllm_and_none_reads_no_calls():
    use = chat_with(tools=[TOOL]).sampling.tool_use
    assert (use.choice, use.named, use.parallel_tool_calls, json.loads(use.tools_json)) == ("auto", False, True, [TOOL])
    none = chat_with(tools=[TOOL], tool_choice="none")
    assert none.sampling.tool_use is None and none.chat.tools == [TOOL]  # the template still shows them
    named = chat_with(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                      parallel_tool_calls=False).sampling.tool_use  # fmt: skip
    assert (named.choice, named.named, named.parallel_tool_calls) == ("get_weather", True, False)


def test_auto_is_refused_where_no_tool_call_parser_is_configured_and_required_is_not():
    with pytest.raises(RequestError, match="tool_call_parser") as refused:
        chat_with(LIMITS, tools=[TOOL])
    assert refused.value.field == "tool_choice"
    assert chat_with(LIMITS, tools=[TOOL], tool_choice="required").sampling.tool_use.choice == "required"


BAD_TOOLS = [
    ("tools", {"tools": []}, "must not be empty"),
    ("tools[0]", {"tools": [{"type": "retrieval"}]}, "function"),
    ("tools[1].function.name", {"tools": [TOOL, TOOL]}, "different for each tool"),
    ("tools[0].function.parameters", {"tools": [{"function": {"name": "f", "parameters": []}}]}, "schema"),
    ("tool_choice", {"tool_choice": "required"}, "needs tools"),
    ("tool_choice", {"tools": [TOOL], "tool_choice": "sometimes"}, "must be"),
    ("tool_choice", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "not one of the tools"),
    ("tool_choice", {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "drop response_format"),
    ("messages[0].tool_calls", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "assistant"),
    ("messages[0].tool_calls[0].function.arguments", {"messages": [{"role": "assistant", "content": None,
     "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "JSON"),
    ("messages[0].tool_call_id", {"messages": [{"role": "tool", "content": "sunny"}]}, "names the call"),
    ("messages[0].refusal", {"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]}, "does not take"),
    ("messages[0].content", {"messages": [{"role": "assistant", "content": None}]}, "must be a string"),
]  # fmt: skip


@pytest.mark.parametrize("field,body,message", BAD_TOOLS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_TOOLS)])
def test_bad_tool_fields_are_named(field, body, message):
    with pytest.raises(RequestError, match=message) as refused:
        chat_with(**body)
    assert refused.value.field == field


def test_an_openai_reply_sent_back_as_history_keeps_its_tool_calls_with_arguments_as_objects():
    call = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    reply = {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
             "function_call": None, "tool_calls": [call]}  # fmt: skip
    answer = {"role": "tool", "tool_call_id": "call-1", "content": "rain", "name": "get_weather"}
    request = chat_with(messages=[{"role": "user", "content": "hi"}, reply, answer], tools=[TOOL])
    as_template_takes_it = {**call, "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    assert request.messages[1]["tool_calls"] == [as_template_takes_it]
    assert request.messages[2] == answer
