"""Training data from JSONL files: records -> token ids and labels -> datasets.

Each line of a file is one JSON object, and every record of a file has the same shape:

* ``{"text": t}``                                  — learn all of t;
* ``{"prompt": p, "completion": c}``               — learn c given p;
* ``{"instruction": i, "input": x, "output": o}``   — Alpaca; ``input`` optional (absent,
  null or "") — the prompt is the Alpaca template (Taori et al., 2023) without its preamble
  sentence, and o is learned. The prompt is exactly (:data:`ALPACA_TEMPLATE`)::

      ### Instruction:
      {instruction}

      ### Input:
      {input}

      ### Response:

  ending in one newline after "Response:"; without an input the two "### Input:" lines and
  their blank line are left out (:data:`ALPACA_TEMPLATE_NO_INPUT`);
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` — a
  conversation, rendered with the tokenizer's chat template (the model's own, or minipeft's
  default ChatML-style one for a model without, see :mod:`minipeft.io.chat_template`); only
  what the assistant wrote is learned: each assistant message's content and the end-of-turn
  token the template writes after it. Roles, headers, system and user turns are not.

Other keys (an "id", a "source" ...) are ignored. Blank lines are skipped.

Tokenisation of a prompt p and a completion c (a text record is p = "", c = t)::

    ids    = encode(p) ++ encode(c, no special tokens) ++ [EOS]
    labels = [−100]·|encode(p)| ++ encode(c) ++ [EOS]

``encode(p)`` adds BOS when the tokenizer's post-processor does (the bundled LLaMA one
does). Prompt and completion are encoded separately so the boundary is exact: every
completion token and the EOS are learned, no prompt token is. A conversation is encoded
as one string, ``ids = encode(render(messages), no special tokens)`` — the ids that
``apply_chat_template(messages, tokenize=True)`` gives at inference, as transformers — and
a token is learned when its characters overlap an assistant span (transformers'
``return_assistant_tokens_mask`` rule); no EOS is appended (the template ends its turns).
Labels are not shifted here (the model shifts them: position t predicts labels[t+1]).
Examples are cut to ``seq_len`` tokens; one left with nothing to learn (a prompt longer than
``seq_len``, a conversation without an assistant turn, or a packed block holding only prompt
tokens) is dropped with a warning: it adds nothing to a batch's loss, and a batch made only
of such examples would have a mean loss of 0/0.

Size: without packing only ``seq_len`` tokens of an example are kept, so a text is cut to
``seq_len * 64`` characters before it is tokenised (a 50 MB line would otherwise cost GBs
of tokenizer memory to keep 64 tokens). If the cut text gives too few tokens to be sure the
first ``seq_len`` are those of the whole text (fewer than ``seq_len + 16``; BPE merges are
local, so in practice a cut changes only the tokens next to it, and it is made at a space),
the cut is made 4x further and the text tokenised again.

Packing concatenates the examples (each already ends in EOS, the separator) into one
stream and cuts it into blocks of ``seq_len`` (the last may be shorter); prompt masks
travel with their tokens. Attention is not reset at example boundaries (as in
transformers' ``group_texts``).

Malformed input raises :class:`~minipeft.errors.DataError` naming the file and line: bad
JSON or UTF-8, a lone surrogate escape (``"\\ud800"``, which is not text), a missing or
non-string field, a malformed conversation, an unreadable file.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..autograd.fused import IGNORE_INDEX
from ..errors import ConfigError, DataError, InputError

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# shape -> (required fields, optional fields)
SHAPES = {
    "text": (("text",), ()),
    "prompt/completion": (("prompt", "completion"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "messages": (("messages",), ()),
}
CHAT_ROLES = ("system", "user", "assistant")

_CHARS_PER_TOKEN = 64  # a text is cut to seq_len * this many characters before tokenising
_CUT_MARGIN = 16  # tokens next to a cut that may differ from the whole text's
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON "\ud800" escapes decode to these; not text


@dataclass(frozen=True)
class Record:
    prompt: str  # not learned ("" for a text record)
    completion: str  # learned, followed by EOS
    source: str  # "file, line N", for messages
    messages: tuple = ()  # a conversation ({"role", "content"} dicts); then prompt/completion are ""


@dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64, IGNORE_INDEX where nothing is learned
    source: str


@dataclass
class Dataset:
    """Tokenised examples plus what batching needs: the pad id and the length limit."""

    examples: list[Example]
    pad_id: int
    seq_len: int
    name: str = ""
    packed: bool = False

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i) -> Example:
        return self.examples[i]

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


# ----- reading ---------------------------------------------------------------------
def _record_shape(obj: dict, where: str) -> str:
    found = [s for s, (req, opt) in SHAPES.items() if any(k in obj for k in req + opt)]
    if len(found) == 1:
        return found[0]
    expected = ('{"text"}, {"prompt", "completion"}, {"instruction", "input" (optional), "output"} '
                'or {"messages"}')
    if not found:
        raise DataError(f"{where}: no known fields (has {sorted(obj)}); expected {expected}")
    raise DataError(f"{where}: mixes the fields of record shapes {' and '.join(found)}; expected {expected}")


def _field(obj: dict, name: str, where: str, optional: bool = False) -> str:
    if name not in obj or (optional and obj[name] is None):
        if optional:
            return ""
        raise DataError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.40}")
    _check_text(value, where, f"field {name!r}")
    return value


def _check_text(value: str, where: str, what: str) -> None:
    surrogate = _SURROGATE.search(value)
    if surrogate:
        raise DataError(f"{where}: {what} holds a lone surrogate escape \\u{ord(surrogate.group()):04x} at "
                        f"character {surrogate.start()}, which is not text (expected valid Unicode)")


def _messages(obj: dict, where: str) -> tuple:
    """The conversation of a messages record, checked: roles known, contents strings."""
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: field 'messages' must be a list of {{'role', 'content'}} objects, "
                        f"got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: field 'messages' is empty; expected at least one message")
    checked = []
    for i, message in enumerate(messages):
        what = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {what} must be an object with 'role' and 'content', "
                            f"got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}: {what} has no {key!r} (has {sorted(message)})")
            if not isinstance(message[key], str):
                raise DataError(f"{where}: {what}.{key} must be a string, got "
                                f"{type(message[key]).__name__} {message[key]!r:.40}")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: {what}.role is {message['role']!r:.40}; expected one of "
                            f"{', '.join(CHAT_ROLES)}")
        _check_text(message["content"], where, f"{what}.content")
        checked.append(dict(message))
    return tuple(checked)


def _to_record(obj: dict, shape: str, where: str) -> Record:
    if shape == "messages":
        return Record("", "", where, _messages(obj, where))
    if shape == "text":
        return Record("", _field(obj, "text", where), where)
    if shape == "prompt/completion":
        return Record(_field(obj, "prompt", where), _field(obj, "completion", where), where)
    instruction, output = _field(obj, "instruction", where), _field(obj, "output", where)
    extra = _field(obj, "input", where, optional=True)
    template = ALPACA_TEMPLATE if extra else ALPACA_TEMPLATE_NO_INPUT
    return Record(template.format(instruction=instruction, input=extra), output, where)


def read_jsonl(path) -> list[Record]:
    """Records of a JSONL file; every problem is a DataError naming the file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file '{path}' does not exist") from None
    except IsADirectoryError:
        raise DataError(f"data file '{path}' is a folder, expected a JSONL file") from None
    except OSError as exc:  # no permission, a path through a file, an I/O error
        raise DataError(f"data file '{path}' cannot be read: {exc.strerror or exc}") from None
    records, first = [], None  # first = (shape, line) that fixes the file's shape
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"'{path}', line {number}"
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")  # tolerate a BOM
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply to read; expected one flat object") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise DataError(f"{where}: invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        shape = _record_shape(obj, where)
        if first is None:
            first = (shape, number)
        elif shape != first[0]:
            raise DataError(f"{where}: a {shape!r} record, but line {first[1]} is a {first[0]!r} record; "
                            "all records of a file must have the same shape")
        records.append(_to_record(obj, shape, where))
    if not records:
        raise DataError(f"data file '{path}' holds no records (it is empty or blank)")
    return records


# ----- tokenising ------------------------------------------------------------------
def _learns_something(labels: np.ndarray) -> bool:
    return bool((labels[1:] != IGNORE_INDEX).any())  # position 0 is never a target (shift)


def _cut(text: str, limit: int) -> str:
    """The first ``limit`` characters of text, ending at a space in the second half if there is one
    (a cut inside a word changes that word's tokens; a cut before a space changes none)."""
    space = text.rfind(" ", limit // 2, limit)
    return text[:space] if space > 0 else text[:limit]


def _encode_prefix(encode, text: str, n_tokens: int | None) -> list:
    """``encode(text)[:n_tokens]``, tokenising no more of a huge text than needed (see the
    module docstring); all of ``encode(text)`` when n_tokens is None (packing keeps everything)."""
    if n_tokens is None:
        return list(encode(text))
    if n_tokens <= 0:
        return []
    limit = n_tokens * _CHARS_PER_TOKEN
    while len(text) > limit:
        ids = encode(_cut(text, limit))
        if len(ids) >= n_tokens + _CUT_MARGIN:
            return list(ids[:n_tokens])
        limit *= 4
    return list(encode(text))[:n_tokens]


def tokenize(record: Record, tokenizer, seq_len: int | None = None) -> Example:
    """ids = encode(prompt) ++ encode(completion) ++ [EOS]; prompt labels masked; cut to seq_len.

    A conversation (``record.messages``) is rendered with the tokenizer's chat template and
    only the assistant's tokens are learned, see the module docstring.
    """
    if record.messages:
        return _tokenize_chat(record, tokenizer, seq_len)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id; training examples end with EOS")
    prompt = _encode_prefix(tokenizer.encode, record.prompt, seq_len)
    if prompt and prompt[-1] == eos:  # a post-processor that appends EOS: it belongs at the very end
        prompt = prompt[:-1]
    budget = None if seq_len is None else seq_len - len(prompt)
    completion = _encode_prefix(lambda text: tokenizer.encode(text, add_special_tokens=False),
                                record.completion, budget) + [eos]
    ids = np.asarray(prompt + completion, dtype=np.int64)
    labels = np.concatenate([np.full(len(prompt), IGNORE_INDEX, np.int64), np.asarray(completion, np.int64)])
    if seq_len is not None:
        ids, labels = ids[:seq_len], labels[:seq_len]
    return Example(ids, labels, record.source)


def _tokenize_chat(record: Record, tokenizer, seq_len: int | None) -> Example:
    """ids of the rendered conversation; a token is learned where it overlaps an assistant span."""
    if not (hasattr(tokenizer, "render_chat_with_assistant_spans") and hasattr(tokenizer, "encode_with_offsets")):
        raise ConfigError(f"{record.source}: a 'messages' record needs a tokenizer with a chat template "
                          f"(minipeft.io.Tokenizer), got {type(tokenizer).__name__}")
    try:
        text, spans = tokenizer.render_chat_with_assistant_spans(list(record.messages))
    except InputError as exc:  # the template refused this conversation (e.g. roles must alternate)
        raise DataError(f"{record.source}: {exc}") from None
    pairs = _encode_prefix(lambda t: list(zip(*tokenizer.encode_with_offsets(t))), text, seq_len)
    ids = np.asarray([i for i, _ in pairs], dtype=np.int64)
    labels = np.full(len(ids), IGNORE_INDEX, np.int64)
    span = 0  # spans and tokens are both in order: one pass (transformers' assistant-mask loop)
    for t, (_, (start, end)) in enumerate(pairs):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            labels[t] = ids[t]
    return Example(ids, labels, record.source)


def _keep_learnable(examples: list[Example], what: str) -> list[Example]:
    kept = [e for e in examples if _learns_something(e.labels)]
    if not kept:
        raise DataError(f"{what}: no example has a token to learn within seq_len "
                        f"(first: {examples[0].source}); raise seq_len or shorten the prompts")
    if len(kept) < len(examples):
        first = next(e for e in examples if not _learns_something(e.labels))
        warnings.warn(f"{what}: dropped {len(examples) - len(kept)} of {len(examples)} examples with no "
                      f"token to learn within seq_len (first: {first.source}); they would add nothing "
                      "to a batch's loss", stacklevel=3)
    return kept


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate the examples and cut the stream into blocks of ``seq_len`` tokens."""
    ids = np.concatenate([e.input_ids for e in examples])
    labels = np.concatenate([e.labels for e in examples])
    starts = np.cumsum([0] + [len(e.input_ids) for e in examples])  # where each example begins
    blocks = []
    for i, begin in enumerate(range(0, len(ids), seq_len)):
        first = examples[int(np.searchsorted(starts, begin, side="right")) - 1].source
        blocks.append(Example(ids[begin:begin + seq_len], labels[begin:begin + seq_len],
                              f"packed block {i} (starts in {first})"))
    return blocks


def build_dataset(records: list[Record], tokenizer, seq_len: int, packing: bool = False,
                  name: str = "data") -> Dataset:
    """Tokenise records (packing them if asked) into a :class:`Dataset`."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    examples = [tokenize(r, tokenizer, None if packing else seq_len) for r in records]
    if packing:
        examples = pack(examples, seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Dataset(_keep_learnable(examples, name), int(pad), seq_len, name, packing)


def split_records(records: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A deterministic (seeded) split; both parts keep file order. At least one record each."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    n_eval = max(1, round(len(records) * eval_fraction))
    if n_eval >= len(records):
        raise DataError(f"{len(records)} record(s) are too few to hold out eval_fraction={eval_fraction} "
                        f"and still train (first: {records[0].source})")
    held = set(np.random.default_rng(seed).permutation(len(records))[:n_eval].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def load_datasets(train_path, tokenizer, seq_len: int, *, eval_path=None, eval_fraction: float = 0.0,
                  packing: bool = False, seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """(train, eval) datasets from JSONL files; eval from ``eval_path`` or a held-out fraction."""
    if eval_path is not None and eval_fraction:
        raise ValueError("give either eval_path or eval_fraction, not both")
    records = read_jsonl(train_path)
    eval_records = read_jsonl(eval_path) if eval_path is not None else None
    if eval_fraction:
        records, eval_records = split_records(records, eval_fraction, seed)
    train = build_dataset(records, tokenizer, seq_len, packing, f"train data '{train_path}'")
    if eval_records is None:
        return train, None
    return train, build_dataset(eval_records, tokenizer, seq_len, packing,
                                f"eval data '{eval_path or train_path}'")
