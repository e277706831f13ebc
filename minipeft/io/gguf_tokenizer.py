"""The tokenizer inside a GGUF file (``tokenizer.ggml.*``) <-> a Hugging Face ``tokenizers`` pipeline.

A GGUF file carries its vocabulary as metadata, not as a ``tokenizer.json``:
``tokenizer.ggml.model`` names the algorithm, ``tokens`` lists the pieces by id,
``token_type`` marks each (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte),
``merges`` (byte-level BPE) or ``scores`` (SentencePiece) give the merge order, ``pre`` names
llama.cpp's pre-tokenizer regex, ``bos_token_id`` / ``eos_token_id`` / ``padding_token_id`` /
``add_bos_token`` the special tokens, and ``tokenizer.chat_template`` the Jinja chat template.

Two algorithms are rebuilt with ``tokenizers``, as transformers' GGUF loader does:

* ``gpt2`` - byte-level BPE (SmolLM2, Llama 3, Qwen2): the vocabulary and merges as stored,
  the pre-tokenizer that ``pre`` names (llama.cpp's ``llama-vocab.cpp`` regexes), a
  ByteLevel decoder. Control tokens become special added tokens, user-defined ones plain
  added tokens, so both stay whole.
* ``llama`` - SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama, the bundled
  stories260K): a GGUF stores no merges, only one score per piece; merges are recovered from
  the vocabulary, best score first (transformers' ``generate_merges``), with the "▁" space
  handling of transformers' llama tokenizer.json.

Writing goes the other way, from a model folder's ``tokenizer.json``, so that ``minipeft merge
--out model.gguf`` gives llama.cpp a complete file. A SentencePiece ``tokenizer.json`` has merges
but no scores: each piece is scored minus the rank of the first merge that makes it, which
reproduces the merge order when read back (llama.cpp's converter reads ``tokenizer.model`` with
the ``sentencepiece`` package instead; minipeft does not depend on it).
"""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import CheckpointError, ConfigError, MiniPeftError
from .gguf import metadata_value, open_gguf

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer name -> (split regex, whether each digit is split off first,
# whether whole words found in the vocabulary skip the merges: llama.cpp's ignore_merges).
_PRE_TOKENIZERS = {
    "gpt2": (_GPT2_SPLIT, False, False),
    "smollm": (_GPT2_SPLIT, True, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, False, False),
}
_SPACE = "\u2581"  # SentencePiece's visible space


def _byte_level_pre_tokenizer(pre: str, path):
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre is {pre!r}; minipeft rebuilds the byte-level "
                              f"pre-tokenizers {', '.join(_PRE_TOKENIZERS)}")
    split, digits, ignore_merges = _PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split == _GPT2_SPLIT:  # ByteLevel's own regex is exactly GPT-2's
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return pre_tokenizers.Sequence(steps), ignore_merges


def _recovered_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    the piece with the better score first (transformers' ``generate_merges``)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        found += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _list(reader, key, path, required=True):
    value = metadata_value(reader, key, path)
    if value is None and not required:
        return None
    if not isinstance(value, list):
        raise CheckpointError(f"{path}: metadata {key!r} must be an array, got {type(value).__name__}")
    return value


def tokenizer_from_gguf(path) -> tuple[tokenizers.Tokenizer, dict, str | None]:
    """``(tokenizers.Tokenizer, special, chat template or None)`` of a GGUF file; ``special`` holds
    ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (int or None) and ``unk_token`` (str or None)."""
    path = Path(path)
    reader = open_gguf(path)
    try:
        return _build_tokenizer(reader, path)
    except MiniPeftError:
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers (Rust) raises plain Exception on bad vocabularies
        raise CheckpointError(f"{path}: the tokenizer metadata does not describe a usable tokenizer "
                              f"({type(exc).__name__}: {exc})") from None


def _build_tokenizer(reader, path: Path):
    kind = metadata_value(reader, "tokenizer.ggml.model", path)
    if kind is None:
        raise CheckpointError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    tokens = _list(reader, "tokenizer.ggml.tokens", path)
    types = _list(reader, "tokenizer.ggml.token_type", path, required=False) or [NORMAL] * len(tokens)
    if len(types) != len(tokens) or len(set(tokens)) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens must be distinct and match token_type in length")
    ids = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        value = metadata_value(reader, f"tokenizer.ggml.{key}", path)
        if value is not None and not (isinstance(value, int) and 0 <= value < len(tokens)):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key} {value!r} is not a token id "
                                  f"(vocabulary of {len(tokens)})")
        ids[role] = value
    vocab = {t: i for i, t in enumerate(tokens)}

    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in _list(reader, "tokenizer.ggml.merges", path)]
        if any(len(m) != 2 for m in merges):
            raise CheckpointError(f"{path}: tokenizer.ggml.merges holds an entry that is not 'left right'")
        pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(
            metadata_value(reader, "tokenizer.ggml.pre", path, "gpt2"), path)
        backend = tokenizers.Tokenizer(BPE(vocab, merges, ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        scores = _list(reader, "tokenizer.ggml.scores", path, required=False) or [0.0] * len(tokens)
        unk = tokens[ids["unk"]] if ids["unk"] is not None else None
        backend = tokenizers.Tokenizer(BPE(vocab, _recovered_merges(tokens, scores), unk_token=unk,
                                           fuse_unk=True, byte_fallback=True))
        if metadata_value(reader, "tokenizer.ggml.add_space_prefix", path, True):
            backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE),
                                                       normalizers.Replace(" ", _SPACE)])
        else:
            backend.normalizer = normalizers.Replace(" ", _SPACE)
        backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say
    else:
        raise CheckpointError(f"{path}: tokenizer.ggml.model is {kind!r}; minipeft rebuilds 'gpt2' "
                              "(byte-level BPE) and 'llama' (SentencePiece BPE) tokenizers")

    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                if k in (CONTROL, UNKNOWN)]
    backend.add_special_tokens(specials)
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED])

    added = []  # (token, id) that the post-processor adds around every text
    for role, default in (("bos", add_bos_default), ("eos", False)):
        wanted = metadata_value(reader, f"tokenizer.ggml.add_{role}_token", path, default)
        added.append((tokens[ids[role]], ids[role]) if wanted and ids[role] is not None else None)
    if any(added):
        bos, eos = ([a[0]] if a else [] for a in added)
        backend.post_processor = processors.TemplateProcessing(
            single=bos + ["$A"] + eos, pair=bos + ["$A"] + eos + bos + ["$B"] + eos,
            special_tokens=[a for a in added if a])
    chat_template = metadata_value(reader, "tokenizer.chat_template", path)
    if chat_template is not None and not isinstance(chat_template, str):
        raise CheckpointError(f"{path}: tokenizer.chat_template must be a string")
    special = {f"{role}_token_id": ids[role] for role in ("bos", "eos", "pad")}
    special["unk_token"] = tokens[ids["unk"]] if ids["unk"] is not None else None
    return backend, special, chat_template


# ----- writing: tokenizer.json -> tokenizer.ggml.* --------------------------------------------
def _pre_name(pre_tokenizer: dict | None, file) -> str:
    """llama.cpp's name for a byte-level tokenizer.json pre-tokenizer (smollm, gpt2, llama-bpe, qwen2)."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if types == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if regex == _PRE_TOKENIZERS[name][0]:
                return name
    raise ConfigError(f"'{file}': its pre_tokenizer ({' + '.join(map(str, types)) or 'none'}) is none of "
                      f"the byte-level ones llama.cpp names ({', '.join(_PRE_TOKENIZERS)})")


def tokenizer_fields_from_folder(folder, vocab_size: int) -> dict:
    """The ``tokenizer.ggml.*`` / ``tokenizer.chat_template`` metadata for a model folder's tokenizer."""
    from .tokenizer import Tokenizer  # the special-token ids as minipeft reads them

    folder = Path(folder)
    file = folder / "tokenizer.json"
    tokenizer = Tokenizer.from_pretrained(folder)
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"'{file}': cannot read it as JSON: {exc}") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConfigError(f"'{file}': model type {model.get('type')!r}; GGUF export supports BPE tokenizers")
    size = tokenizer.vocab_size
    if size > vocab_size:
        raise ConfigError(f"'{file}': {size} tokens, more than the model's vocab_size {vocab_size}")
    tokens = [None] * vocab_size
    for piece, index in model["vocab"].items():
        tokens[index] = piece
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    for index, token in added.items():
        tokens[index] = token["content"]
    # convert_hf_to_gguf pads a vocabulary shorter than the embedding with unused placeholders
    types = [UNUSED if t is None else NORMAL for t in tokens]
    tokens = [f"[PAD{i}]" if t is None else t for i, t in enumerate(tokens)]
    for index, token in added.items():
        types[index] = CONTROL if token.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    fields: dict = {}
    if model.get("byte_fallback"):  # SentencePiece-style: pieces with "▁", <0xNN> byte pieces
        if model.get("unk_token") in model["vocab"]:
            types[model["vocab"][model["unk_token"]]] = UNKNOWN
        first_rank = {}
        for rank, merge in enumerate(merges):
            first_rank.setdefault(merge.replace(" ", ""), rank)
        for index, piece in enumerate(tokens):
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and types[index] == NORMAL:
                types[index] = BYTE
        scores = [-float(first_rank[t]) if t in first_rank and types[i] == NORMAL else
                  -float(len(merges) + i) if types[i] == NORMAL else 0.0
                  for i, t in enumerate(tokens)]
        normalizer = json.dumps(spec.get("normalizer"))
        metaspace = json.dumps(spec.get("pre_tokenizer"))  # newer files: Metaspace(prepend_scheme=...)
        fields.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                       "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                       "tokenizer.ggml.add_space_prefix": '"Prepend"' in normalizer
                       or any(f'"prepend_scheme": "{scheme}"' in metaspace for scheme in ("always", "first"))})
    else:
        fields.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(spec.get("pre_tokenizer"), file),
                       "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                       "tokenizer.ggml.merges": merges})
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        value = getattr(tokenizer, f"{role}_token_id")
        if value is not None:
            fields[f"tokenizer.ggml.{key}"] = int(value)
    if model.get("unk_token") in model["vocab"]:
        fields["tokenizer.ggml.unknown_token_id"] = model["vocab"][model["unk_token"]]
    # Whether BOS / EOS are added is what the post-processor does to a plain text.
    probe = tokenizer.encode("a")
    fields["tokenizer.ggml.add_bos_token"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    fields["tokenizer.ggml.add_eos_token"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):  # as Tokenizer reads it (chat_template.jinja, tokenizer_config)
        fields["tokenizer.chat_template"] = tokenizer.chat_template
    return fields


def tokenizer_fields_from_gguf(path) -> dict:
    """The tokenizer metadata of a GGUF file, to copy into another (merge of a GGUF base)."""
    path = Path(path)
    reader = open_gguf(path)
    return {key: metadata_value(reader, key, path) for key in reader.fields
            if key.startswith("tokenizer.")}
