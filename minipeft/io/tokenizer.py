"""A thin tokenizer over Hugging Face ``tokenizers`` that reads an HF model folder.

Why this and not ``transformers.AutoTokenizer``: minipeft needs only text <->
ids and the BOS/EOS/PAD ids, and ``tokenizers`` (a small Rust wheel) does the
real work for both libraries, so we get the same ids without importing
transformers. ``tokenizer.json`` holds the whole pipeline (normalizer,
pre-tokenizer, model, post-processor, decoder); the post-processor decides
whether BOS/EOS are added, which is also what transformers'
``PreTrainedTokenizerFast`` does. The bundled model's post-processor adds
BOS (id 1) and no EOS.

The special-token strings come from ``tokenizer_config.json`` and then
``special_tokens_map.json`` (which wins where it sets a value, as in
transformers); values may be plain strings or ``{"content": ...}`` objects.
Ids that are still unknown fall back to ``config.json``'s
``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``.

Chat: the template is read as transformers reads it: ``chat_template.jinja`` in the folder,
else ``tokenizer_config.json``'s ``"chat_template"`` (a string, or a list of
``{"name", "template"}`` of which "default" is used), plus named templates in
``additional_chat_templates/*.jinja``. :meth:`Tokenizer.apply_chat_template` renders it with
:mod:`.chat_template`; a tokenizer without one uses
:data:`~minipeft.io.chat_template.DEFAULT_CHAT_TEMPLATE` and warns once.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import tokenizers

from ..errors import CheckpointError, ConfigError, InputError
from .chat_template import DEFAULT_CHAT_TEMPLATE, assistant_spans, render_chat
from .checkpoint import read_json

_ROLES = ("bos", "eos", "pad")


def _token_string(value, file: Path, field: str) -> str | None:
    """A special token as written in a config: None, "<s>" or {"content": "<s>", ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(
        f"'{file}': {field} must be a string or an object with 'content', got {value!r}"
    )


def _read_text(file: Path, what: str) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} '{file}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{what} '{file}' cannot be read: {exc.strerror or exc}") from None


def _read_chat_templates(folder: Path) -> tuple[str | None, dict[str, str]]:
    """(default template, {name: template}) of a model folder, in transformers' order of precedence."""
    default, named = None, {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        value = read_json(config_file, "tokenizer config", ConfigError).get("chat_template")
        if isinstance(value, list):  # transformers' [{"name": ..., "template": ...}, ...] form
            for i, entry in enumerate(value):
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                        and isinstance(entry.get("template"), str)):
                    raise ConfigError(f"'{config_file}': chat_template[{i}] must be an object with string "
                                      f"'name' and 'template', got {entry!r:.60}")
                named[entry["name"]] = entry["template"]
            default = named.pop("default", None)
        elif value is not None and not isinstance(value, str):
            raise ConfigError(f"'{config_file}': chat_template must be a string or a list of "
                              f"{{name, template}} objects, got {type(value).__name__}")
        else:
            default = value
    jinja_file = folder / "chat_template.jinja"  # written by transformers >= 4.49; wins over the config
    if jinja_file.is_file():
        default = _read_text(jinja_file, "chat template")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            named[file.name.removesuffix(".jinja")] = _read_text(file, "chat template")
    return default, named


class Tokenizer:
    """Text <-> token ids for one model, plus its special-token ids.

    Attributes: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (int or
    None) and ``vocab_size`` (including added tokens, like ``len()``).
    Padding and truncation settings stored in ``tokenizer.json`` are switched
    off: ``encode`` returns each text's full ids, and batching pads later.

    ``chat_template`` (str or None) is the model's Jinja chat template; a GGUF loader or
    the user may set it. ``chat_templates`` holds named extra templates (``{name: text}``).
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 chat_template: str | None = None, unk_token: str | None = None):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for role, value in zip(_ROLES, (bos_token_id, eos_token_id, pad_token_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{role}_token_id {value} is outside the vocabulary "
                                  f"(size {self.vocab_size})")
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token = unk_token
        self.chat_template = chat_template
        self.chat_templates: dict[str, str] = {}
        self._warned_default_template = False

    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        """Load ``folder/tokenizer.json`` and the special tokens named in the folder's configs."""
        folder = Path(folder)
        if folder.suffix.lower() == ".gguf" and not folder.is_dir():  # llama.cpp file: tokenizer.ggml.*
            from .gguf_tokenizer import tokenizer_from_gguf
            backend, special, template = tokenizer_from_gguf(folder)
            return cls(backend, chat_template=template, **special)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                f"model folder '{folder}' has no tokenizer.json (minipeft reads only the "
                "Hugging Face 'tokenizers' format; save_pretrained of a fast tokenizer writes it)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception
            raise CheckpointError(f"tokenizer file '{path}' could not be read: {exc}") from None

        strings: dict[str, tuple[str, Path]] = {}  # role -> (token string, file it came from)
        unk_token = None  # only a template variable; the model never needs its id
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            file = folder / name
            if not file.is_file():
                continue
            config = read_json(file, "tokenizer config", ConfigError)
            unk_token = _token_string(config.get("unk_token"), file, "unk_token") or unk_token
            for role in _ROLES:
                token = _token_string(config.get(f"{role}_token"), file, f"{role}_token")
                if token is not None:
                    strings[role] = (token, file)

        ids: dict[str, int | None] = dict.fromkeys(_ROLES)
        for role, (token, file) in strings.items():
            ids[role] = backend.token_to_id(token)
            if ids[role] is None:
                raise ConfigError(f"'{file}': {role}_token {token!r} is not in the vocabulary "
                                  f"of '{path}'")
        model_config = folder / "config.json"
        if any(v is None for v in ids.values()) and model_config.is_file():
            config = read_json(model_config, "model config", ConfigError)
            for role in _ROLES:
                value = config.get(f"{role}_token_id")
                if isinstance(value, list):  # some configs list several EOS ids
                    value = value[0] if value else None
                if ids[role] is None and value is not None:
                    if not isinstance(value, int) or isinstance(value, bool):
                        raise ConfigError(f"'{model_config}': {role}_token_id must be an int, "
                                          f"got {value!r}")
                    ids[role] = value
        tokenizer = cls(backend, ids["bos"], ids["eos"], ids["pad"], unk_token=unk_token)
        tokenizer.chat_template, tokenizer.chat_templates = _read_chat_templates(folder)
        return tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; the tokenizer.json post-processor adds BOS/EOS if asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Iterable[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """``encode`` for many texts at once (in parallel in the Rust library); no padding."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"encode_batch: texts[{i}] is a {type(text).__name__}, expected str"
                )
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, NumPy or CuPy array); special tokens dropped by default."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise InputError(
                    f"decode: id {i} is outside the vocabulary (size {self.vocab_size})"
                )
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (no special tokens added) and each token's (start, end) characters in it."""
        if not isinstance(text, str):
            raise TypeError(f"encode_with_offsets expects a str, got {type(text).__name__}")
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    # ----- chat --------------------------------------------------------------------
    @property
    def special_tokens(self) -> dict[str, str]:
        """The special-token strings a chat template sees (``bos_token``, ``eos_token``, ...)."""
        tokens = {f"{role}_token": self.backend.id_to_token(i)
                  for role, i in zip(_ROLES, (self.bos_token_id, self.eos_token_id, self.pad_token_id))
                  if i is not None}
        if self.unk_token is not None:
            tokens["unk_token"] = self.unk_token
        return tokens

    def get_chat_template(self, chat_template: str | None = None) -> str:
        """The template to render: ``chat_template`` (a name in ``chat_templates`` or a template's
        text), else the model's own, else the default (with a warning, once per tokenizer)."""
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if self.chat_template is not None:
            return self.chat_template
        if self.chat_templates:
            raise ConfigError(f"this tokenizer has several chat templates and none is 'default'; pass "
                              f"chat_template= one of {sorted(self.chat_templates)}")
        if not self._warned_default_template:
            self._warned_default_template = True
            warnings.warn("this tokenizer has no chat template; using minipeft's default (ChatML turns, "
                          "each ended by the model's EOS token, see minipeft.io.chat_template."
                          "DEFAULT_CHAT_TEMPLATE)", UserWarning, stacklevel=3)
        return DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            chat_template: str | None = None):
        """Render a conversation with the chat template, as transformers' ``apply_chat_template``.

        ``messages`` is a list of ``{"role": ..., "content": ...}`` dicts. With
        ``add_generation_prompt`` the template's header for the assistant's next turn is
        appended. Returns the string, or with ``tokenize=True`` its ids, tokenized without
        adding special tokens again (the template writes the ones it wants), as transformers.
        A tokenizer without a template of its own uses
        :data:`~minipeft.io.chat_template.DEFAULT_CHAT_TEMPLATE` and warns once (transformers
        raises instead; minipeft's bundled model has no template and chat fine-tuning on it
        is a documented use). Departure: ``tokenize`` defaults to False (transformers: True).
        """
        text = render_chat(self.get_chat_template(chat_template), messages, add_generation_prompt,
                           self.special_tokens)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def render_chat_with_assistant_spans(self, messages, chat_template: str | None = None
                                         ) -> tuple[str, list[tuple[int, int]]]:
        """(rendered conversation, character spans the assistant wrote), for assistant-only loss;
        see :func:`minipeft.io.chat_template.assistant_spans`."""
        return assistant_spans(self.get_chat_template(chat_template), messages, self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_id={self.eos_token_id}, pad_token_id={self.pad_token_id})")
