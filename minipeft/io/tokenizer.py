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
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import tokenizers

from ..errors import CheckpointError, ConfigError, InputError
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


class Tokenizer:
    """Text <-> token ids for one model, plus its special-token ids.

    Attributes: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (int or
    None) and ``vocab_size`` (including added tokens, like ``len()``).
    Padding and truncation settings stored in ``tokenizer.json`` are switched
    off: ``encode`` returns each text's full ids, and batching pads later.
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None):
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

    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        """Load ``folder/tokenizer.json`` and the special tokens named in the folder's configs."""
        folder = Path(folder)
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
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            file = folder / name
            if not file.is_file():
                continue
            config = read_json(file, "tokenizer config", ConfigError)
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
        return cls(backend, ids["bos"], ids["eos"], ids["pad"])

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

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_id={self.eos_token_id}, pad_token_id={self.pad_token_id})")
