"""Tokenizers: a Hugging Face ``tokenizer.json`` (with the model directory's chat template), or a
byte-level fallback that needs no files (tests, random models).

Both have ``encode(text) -> list[int]`` (no special tokens added), ``decode(ids)``, ``bos_id`` /
``eos_id`` (None when the tokenizer has none), ``vocab_size`` and
``render_chat(messages, add_generation_prompt=False) -> str``.
"""

from __future__ import annotations

import datetime
import json
import pathlib

# The byte tokenizer's chat format (the model directory's template replaces it for real models).
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _render(template: str, messages: list[dict], add_generation_prompt: bool, **extra) -> str:
    """Renders a chat template the way transformers does (sandboxed Jinja, trimmed blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **extra
    )


class ByteTokenizer:
    """UTF-8 bytes: id = byte + 3; 0 = padding, 1 = <bos>, 2 = <eos>. Vocabulary 259."""

    PAD, BOS, EOS = 0, 1, 2
    vocab_size = 259
    bos_id, eos_id = BOS, EOS

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return _render(BYTE_CHAT_TEMPLATE, messages, add_generation_prompt)


class HFTokenizer:
    """``tokenizer.json`` through the `tokenizers` library; special tokens and the chat template from
    ``tokenizer_config.json`` (or ``chat_template.jinja``) beside it."""

    def __init__(self, directory: str | pathlib.Path):
        from tokenizers import Tokenizer

        directory = pathlib.Path(directory)
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = directory / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template
        self.bos_token, self.eos_token = (
            self._special(config, "bos_token"),
            self._special(config, "eos_token"),
        )
        self.bos_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self.tokenizer.get_vocab_size()

    @staticmethod
    def _special(config: dict, key: str) -> str | None:
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; use prompt/completion records instead")
        return _render(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def load_tokenizer(path: str | pathlib.Path | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a model directory (its tokenizer.json), or the byte tokenizer for None, "" or
    "bytes"."""
    if not path or str(path) == "bytes":
        return ByteTokenizer()
    path = pathlib.Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json (set data.tokenizer=bytes for the byte tokenizer)"
        )
    return HFTokenizer(path)


def model_tokenizer(path: str | pathlib.Path | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a model directory when it has a tokenizer.json, else the byte tokenizer (also
    for no directory)."""
    if path and (pathlib.Path(path) / "tokenizer.json").is_file():
        return HFTokenizer(path)
    return ByteTokenizer()
