"""Tokenization in the router: the model directory's tokenizer.json and its chat template.

Uses the ``tokenizers`` library and ``jinja2`` directly, not ``transformers``, so
the router never loads torch.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """The model directory has no usable tokenizer or chat template."""


class ModelTokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        try:
            self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as exc:
            raise TokenizerError(f"{model_dir}: cannot load tokenizer.json: {exc}") from exc
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_id = self._tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self._add_bos = bool(config.get("add_bos_token", False))
        template = _chat_template_source(model_dir, config)
        # The environment transformers' apply_chat_template renders in, so a template renders alike here.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        self._chat_template = env.from_string(template) if template is not None else None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text``'s ids, BOS first where the tokenizer config asks for it (``add_special_tokens``): not
        for a rendered chat, whose template writes its own, as vLLM and transformers encode chats."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos and self.bos_token:
            ids = [self._tokenizer.token_to_id(self.bos_token), *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each id's vocabulary entry (transformers' ``convert_ids_to_tokens``)."""
        return [self._tokenizer.id_to_token(token_id) for token_id in token_ids]

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
    ) -> str:
        """The chat as transformers' ``apply_chat_template`` renders it: ``continue_final_message`` leaves
        the last message open (the text ends where its content ends), ``template_kwargs`` and ``tools`` (their
        definitions, for the template to show the model) reach the template."""
        if self._chat_template is None:
            raise TokenizerError("this model has no chat template")
        if continue_final_message:
            messages = [*messages[:-1], {**messages[-1], "content": (messages[-1]["content"] or "") + _CONTINUE_TAG}]
        try:
            text = self._chat_template.render(
                **(template_kwargs or {}),
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc
        if not continue_final_message:
            return text
        if _CONTINUE_TAG.strip() not in text:
            raise TokenizerError("continue_final_message: the template does not render the final message's content")
        at = text.rindex(_CONTINUE_TAG.strip())
        return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for where the final message ends


def _chat_template_source(model_dir: Path, config: dict) -> str | None:
    """``chat_template.jinja`` beside the tokenizer (where transformers saves it), else the tokenizer config's
    template: a string, or the one named "default" in a list of named templates."""
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' ``tojson``: not Jinja's, which escapes HTML characters."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} form
        return token.get("content")
    return token


def _raise_template_error(message: str):
    raise jinja2.TemplateError(message)
