"""Tokenization in the router: the model directory's tokenizer.json and its chat template.

Uses the ``tokenizers`` library and ``jinja2`` directly, not ``transformers``, so
the router never loads torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
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
        template = config.get("chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        self._chat_template = env.from_string(template) if isinstance(template, str) else None

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

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._chat_template is None:
            raise TokenizerError("this model has no chat template")
        try:
            return self._chat_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} form
        return token.get("content")
    return token


def _raise_template_error(message: str):
    raise jinja2.TemplateError(message)
