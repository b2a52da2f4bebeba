"""Prompts as vLLM's server renders and tokenizes them: /tokenize, /detokenize and the chat template controls,
checked against transformers on the same directory."""

from __future__ import annotations

import json

import pytest

from router.request import (
    RequestError,
    RequestLimits,
    parse_detokenize_request,
    parse_request,
    parse_tokenize_request,
    tokenize,
    tokenize_only,
)
from router.tokenizer import ModelTokenizer

LIMITS = RequestLimits(context_length=512, vocab_size=1024, max_body_bytes=4096)
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def model_dir(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return ModelTokenizer(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def ids(tokenizer, **body) -> list[int]:
    return tokenize_only(parse_tokenize_request(json.dumps(body).encode(), LIMITS), tokenizer)


def test_a_prompt_is_tokenized_as_transformers_tokenizes_it_with_and_without_special_tokens(tokenizer, reference):
    text = "Hello, naïve café 🙂"
    assert ids(tokenizer, prompt=text) == reference(text).input_ids
    assert ids(tokenizer, prompt=text, add_special_tokens=False) == reference(text, add_special_tokens=False).input_ids


def test_a_chat_is_tokenized_as_apply_chat_template_tokenizes_it(tokenizer, reference):
    def chat_ids(add_generation_prompt: bool) -> list[int]:
        rendered = reference.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, return_dict=True)
        return rendered["input_ids"]

    assert ids(tokenizer, messages=CHAT) == chat_ids(True)
    without = chat_ids(False)
    assert ids(tokenizer, messages=CHAT, add_generation_prompt=False) == without
    assert without != ids(tokenizer, messages=CHAT)


def test_token_strings_are_the_vocabulary_entries(tokenizer, reference):
    request = parse_tokenize_request(b'{"prompt": "Hello world", "return_token_strs": true}', LIMITS)
    tokens = tokenize_only(request, tokenizer)
    assert request.return_token_strs
    assert tokenizer.token_strings(tokens) == reference.convert_ids_to_tokens(tokens)


def test_detokenize_gives_transformers_text_special_tokens_included(tokenizer, reference):
    tokens = ids(tokenizer, messages=CHAT)
    model, parsed = parse_detokenize_request(json.dumps({"model": "m", "tokens": tokens}).encode(), LIMITS)
    assert (model, parsed) == ("m", tokens)
    assert tokenizer.decode(tokens, skip_special_tokens=False) == reference.decode(tokens)


BAD_TOKENIZE = [
    ("prompt", {}, "is required"),
    ("prompt", {"prompt": 3}, "must be a string"),
    ("messages", {"messages": []}, "non-empty list"),
    (
        "continue_final_message",
        {"messages": CHAT, "continue_final_message": True, "add_generation_prompt": True},
        "cannot be true with add_generation_prompt",
    ),
    ("chat_template_kwargs", {"messages": CHAT, "chat_template_kwargs": {"messages": []}}, "may not set 'messages'"),
    ("chat_template", {"messages": CHAT, "chat_template": "{{ x }}"}, "unknown field"),
    ("add_generation_prompt", {"prompt": "x", "add_generation_prompt": False}, "unknown field"),
    ("add_special_tokens", {"prompt": "x", "add_special_tokens": "yes"}, "must be a boolean"),
]


@pytest.mark.parametrize("field,body,message", BAD_TOKENIZE, ids=[f for f, _, _ in BAD_TOKENIZE])
def test_bad_tokenize_fields_are_named(field, body, message):
    with pytest.raises(RequestError, match=message) as info:
        parse_tokenize_request(json.dumps(body).encode(), LIMITS)
    assert info.value.field == field


BAD_DETOKENIZE = [
    ("tokens", {}, "is required"),
    ("tokens", {"tokens": [1, 4096]}, r"outside the vocabulary \[0, 1024\)"),
    ("tokens", {"tokens": [1, True]}, "must be integers"),
    ("prompt", {"tokens": [1], "prompt": "x"}, "unknown field"),
]


@pytest.mark.parametrize(
    "field,body,message", BAD_DETOKENIZE, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_DETOKENIZE)]
)
def test_bad_detokenize_fields_are_named(field, body, message):
    with pytest.raises(RequestError, match=message) as info:
        parse_detokenize_request(json.dumps(body).encode(), LIMITS)
    assert info.value.field == field


def tokenizer_copy(model_dir, tmp_path, template: str | None = None, named: list | None = None):
    """The tiny model's tokenizer in a folder of its own, with a chat template in ``chat_template.jinja``
    (``template``) or named templates in its config (``named``); the router's tokenizer and transformers' on it."""
    import shutil

    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if named is not None:
        config["chat_template"] = named
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
    return ModelTokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)


def chat_ids(reference, messages, **kwargs) -> list[int]:
    return reference.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"]


def test_continue_final_message_leaves_the_last_message_open_as_transformers_does(tokenizer, reference):
    partial = [*CHAT, {"role": "assistant", "content": "Once upon a"}]
    expected = chat_ids(reference, partial, add_generation_prompt=False, continue_final_message=True)
    assert ids(tokenizer, messages=partial, continue_final_message=True) == expected
    assert reference.decode(expected).endswith("Once upon a")


def test_chat_template_kwargs_reach_a_template_read_from_chat_template_jinja(model_dir, tmp_path):
    template = "{% if shout %}LOUD {% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    router_side, reference = tokenizer_copy(model_dir, tmp_path, template=template)
    loud = ids(router_side, messages=CHAT, chat_template_kwargs={"shout": True})
    assert loud == chat_ids(reference, CHAT, add_generation_prompt=True, shout=True)
    assert loud != ids(router_side, messages=CHAT)


def test_the_default_of_named_templates_renders_as_in_transformers(model_dir, tmp_path):
    default = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    named = [{"name": "default", "template": default}, {"name": "tool_use", "template": "{{ messages | length }}"}]
    router_side, reference = tokenizer_copy(model_dir, tmp_path, named=named)
    assert ids(router_side, messages=CHAT) == chat_ids(reference, CHAT)


def test_the_developer_role_reaches_the_template(tokenizer, reference):
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ids(tokenizer, messages=messages) == chat_ids(reference, messages, add_generation_prompt=True)


def test_a_chat_completion_renders_with_the_controls_tokenize_takes(tokenizer):
    partial = [*CHAT, {"role": "assistant", "content": "Once upon a"}]
    body = {"messages": partial, "continue_final_message": True, "max_tokens": 4}
    generation = tokenize(parse_request(body, "chat", LIMITS), tokenizer, LIMITS)
    assert generation == ids(tokenizer, messages=partial, continue_final_message=True)
    assert generation != tokenize(
        parse_request({"messages": partial, "max_tokens": 4}, "chat", LIMITS), tokenizer, LIMITS
    )


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "today's weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call-1", "content": "sunny"},
]  # fmt: skip


def test_tools_and_tool_calls_reach_the_template_as_apply_chat_template_gives_them(tokenizer, reference):
    """OpenAI's history (arguments as JSON text) renders as transformers renders it with arguments as objects,
    the form vLLM and transformers hand templates."""
    as_objects = json.loads(json.dumps(TOOL_CHAT))
    as_objects[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    expected = reference.apply_chat_template(as_objects, tools=[WEATHER], add_generation_prompt=True, return_dict=True)
    got = ids(tokenizer, messages=TOOL_CHAT, tools=[WEATHER])
    assert got == expected["input_ids"]
    text = tokenizer.decode(got, skip_special_tokens=False)
    assert '"name": "get_weather"' in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert got != ids(tokenizer, messages=TOOL_CHAT)  # without tools, the template shows none


def test_the_system_fingerprint_follows_the_serving_configuration():
    from router.http_api import system_fingerprint
    from router.service import ModelInfo

    model = ModelInfo("tiny", "/models/tiny", 32, 1024, 1024)
    assert system_fingerprint(model) == system_fingerprint(ModelInfo("tiny", "/elsewhere/tiny", 32, 1024, 1024))
    assert system_fingerprint(model) != system_fingerprint(ModelInfo("tiny", "/models/tiny", 32, 2048, 1024))
    assert system_fingerprint(model) != system_fingerprint(ModelInfo("tiny", "/models/tiny", 32, 1024, 1024, "hermes"))
