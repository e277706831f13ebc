"""Chat training data ({"messages": [...]} records): loss on assistant turns only, checked token
by token against the rendered template and against transformers' assistant mask; malformed
conversations; and the hardening of every record shape (lone surrogates, unreadable files,
huge lines tokenised only as far as seq_len needs)."""
from __future__ import annotations

import json
import tracemalloc
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.data import bundled_model_path
from minipeft.errors import ConfigError, DataError
from minipeft.io import Tokenizer
from minipeft.train import Record, build_dataset, load_datasets, pack, read_jsonl, tokenize
from minipeft.train import data as data_module
from tests.io.chat_fixtures import GENERATION_MARKED, chatml_tokenizer_folder
from tests.train.train_helpers import CharTokenizer, write_jsonl

M = -100
CONVERSATION = [
    {"role": "system", "content": "You are a cat."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am a little cat."},
    {"role": "user", "content": "What do you like?"},
    {"role": "assistant", "content": "I like to sit on the mat, 12 * 12 = 144 times."},
]


@pytest.fixture(scope="module")
def bundled():
    tok = Tokenizer.from_pretrained(bundled_model_path())
    with warnings.catch_warnings():  # the once-per-tokenizer "no chat template" warning
        warnings.simplefilter("ignore")
        tok.get_chat_template()
    return tok


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return Tokenizer.from_pretrained(chatml_tokenizer_folder(tmp_path_factory.mktemp("chatml")))


def _record(tmp_path, messages=CONVERSATION) -> Record:
    (record,) = read_jsonl(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "id": 3}]))
    return record


def _expected_learned_chars(text: str, messages, end_of_turn: str) -> np.ndarray:
    """Independently of the code under test: which characters of the rendered conversation are the
    assistant's (its content and the end-of-turn token right after it), found by searching the text."""
    learned = np.zeros(len(text), bool)
    position = 0
    for message in messages:
        found = text.index(message["content"] + end_of_turn if message["role"] == "assistant"
                           else message["content"], position)
        end = found + len(message["content"])
        if message["role"] == "assistant":
            end += len(end_of_turn)
            learned[found:end] = True
        position = end
    return learned


def _check_mask_token_by_token(tok, record, end_of_turn):
    text = tok.apply_chat_template(list(record.messages))
    example = tokenize(record, tok)
    ids, offsets = tok.encode_with_offsets(text)
    assert example.input_ids.tolist() == ids == tok.apply_chat_template(list(record.messages), tokenize=True)
    learned_chars = _expected_learned_chars(text, record.messages, end_of_turn)
    for t, (start, end) in enumerate(offsets):
        piece = text[start:end]
        if learned_chars[start:end].any():  # the assistant wrote (part of) this token: learned
            assert example.labels[t] == ids[t], f"token {t} {piece!r} should be learned"
        else:  # role headers, system and user text, the newline after the end token
            assert example.labels[t] == M, f"token {t} {piece!r} should not be learned"
    # and the learned tokens are exactly the assistant's turns, each with its end-of-turn token
    runs, current = [], []
    for t, label in enumerate(example.labels.tolist()):
        if label != M:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    turns = [m["content"] + end_of_turn for m in record.messages if m["role"] == "assistant"]
    assert ["".join(text[offsets[t][0]:offsets[t][1]] for t in run).lstrip("\n ") for run in runs] == turns
    assert sum(example.labels == tok.eos_token_id) == len(turns)  # every turn's end token is learned


def test_messages_record_is_read(tmp_path):
    record = _record(tmp_path)
    assert record.messages == tuple(CONVERSATION) and (record.prompt, record.completion) == ("", "")
    assert record.source.endswith("chat.jsonl', line 1")


def test_mask_token_by_token_bundled_default_template(tmp_path, bundled):
    # the bundled model has no template: the default one, whose turns end with </s>
    _check_mask_token_by_token(bundled, _record(tmp_path), "</s>")


def test_mask_token_by_token_smollm2_template(tmp_path, chatml):
    _check_mask_token_by_token(chatml, _record(tmp_path), "<|im_end|>")
    no_system = _record(tmp_path, CONVERSATION[1:])  # the template adds its default system turn: not learned
    _check_mask_token_by_token(chatml, no_system, "<|im_end|>")


def test_mask_equals_transformers_assistant_mask(tmp_path, chatml):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (the oracle)")
    folder = chatml_tokenizer_folder(tmp_path / "marked", chat_template=GENERATION_MARKED)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    marked = Tokenizer.from_pretrained(folder)
    for messages in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[:3] + [{"role": "user", "content": "Bye"}]):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        record = _record(tmp_path, messages)
        for tok in (chatml, marked):  # spans from rendered prefixes, and from {% generation %}
            example = tokenize(record, tok)
            assert example.input_ids.tolist() == list(out["input_ids"])
            assert (example.labels != M).astype(int).tolist() == list(out["assistant_masks"])


def test_chat_dataset_truncates_packs_and_drops(tmp_path, bundled):
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}, {"messages": CONVERSATION[1:3]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    full = [tokenize(r, bundled) for r in read_jsonl(path)]
    with pytest.warns(UserWarning, match="dropped 1 of 3 .*line 2"):  # no assistant turn: nothing to learn
        ds = build_dataset(read_jsonl(path), bundled, seq_len=80)  # 151 and 53 tokens
    assert [len(e.input_ids) for e in ds.examples] == [80, 53]
    assert ds.examples[0].input_ids.tolist() == full[0].input_ids[:80].tolist()
    assert ds.examples[0].labels.tolist() == full[0].labels[:80].tolist()
    assert ds.examples[1].labels.tolist() == full[2].labels.tolist()
    blocks = pack(full, 32)  # masks travel with their tokens
    assert np.concatenate([b.labels for b in blocks]).tolist() == np.concatenate([e.labels for e in full]).tolist()
    with pytest.warns(UserWarning, match="dropped 4 of 8"):  # blocks of system / user text only
        packed = build_dataset(read_jsonl(path), bundled, seq_len=32, packing=True)
    assert [b.input_ids.tolist() for b in packed.examples] == \
        [b.input_ids.tolist() for b in blocks if (b.labels[1:] != M).any()]
    train, evaluation = load_datasets(write_jsonl(tmp_path / "t.jsonl", [rows[0], rows[2]] * 3), bundled,
                                      seq_len=200, eval_path=write_jsonl(tmp_path / "e.jsonl", rows[2:]))
    assert len(train) == 6 and len(evaluation) == 1
    assert train.examples[0].labels.tolist() == full[0].labels.tolist()


def test_template_refusal_names_the_line(tmp_path, chatml):
    alternating = Tokenizer(chatml.backend, chatml.bos_token_id, chatml.eos_token_id, chat_template=(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}"))
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"c.jsonl', line 2: .*roles must alternate"):
        build_dataset(read_jsonl(path), alternating, seq_len=64)


def test_chat_needs_a_chat_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="line 1: a 'messages' record needs a tokenizer with a chat template"):
        tokenize(_record(tmp_path), CharTokenizer())


BAD_CONVERSATIONS = [
    ("not a list", r"field 'messages' must be a list .*got str"),
    ({"role": "user"}, r"field 'messages' must be a list .*got dict"),
    ([], r"field 'messages' is empty"),
    (["hi"], r"messages\[0\] must be an object with 'role' and 'content', got str"),
    ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], r"messages\[1\] has no 'content'"),
    ([{"role": "tool", "content": "42"}], r"messages\[0\]\.role is 'tool'; expected one of system, user, assistant"),
    ([{"role": 1, "content": "hi"}], r"messages\[0\]\.role must be a string, got int"),
    ([{"role": "user", "content": ["a", "b"]}], r"messages\[0\]\.content must be a string, got list"),
    ([{"role": "user", "content": None}], r"messages\[0\]\.content must be a string, got NoneType"),
]


@pytest.mark.parametrize("messages, match", BAD_CONVERSATIONS)
def test_malformed_conversation_names_file_and_line(tmp_path, messages, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION[1:3]}, {"messages": messages}])
    with pytest.raises(DataError, match=r"bad.jsonl', line 2: " + match):
        read_jsonl(path)


def test_messages_do_not_mix_with_other_shapes(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"messages": CONVERSATION}, {"text": "a story"}])
    with pytest.raises(DataError, match=r"line 2: a 'text' record, but line 1 is a 'messages' record"):
        read_jsonl(path)
    with pytest.raises(DataError, match=r"line 1: mixes the fields of record shapes text and messages"):
        read_jsonl(write_jsonl(tmp_path / "both.jsonl", [{"messages": CONVERSATION, "text": "x"}]))


# ----- hardening of every record shape ------------------------------------------------
@pytest.mark.parametrize("row, what", [
    ({"text": "a\ud800b"}, "field 'text'"),
    ({"prompt": "p", "completion": "\udfff"}, "field 'completion'"),
    ({"instruction": "i", "input": "x\udc80", "output": "o"}, "field 'input'"),
    ({"messages": [{"role": "user", "content": "hi \ud83d"}]}, r"messages\[0\]\.content"),
])
def test_lone_surrogate_is_a_data_error(tmp_path, bundled, row, what):
    path = tmp_path / "s.jsonl"
    line = json.dumps(row)  # json.dumps writes the surrogate as an escape, e.g. "\ud800"
    assert "\\ud" in line
    path.write_text(line.replace("\\ud", "x") + "\n" + line + "\n", encoding="utf-8")  # line 1 is clean
    with pytest.raises(DataError, match=rf"s.jsonl', line 2: {what} holds a lone surrogate escape"):
        build_dataset(read_jsonl(path), bundled, seq_len=16)


@pytest.mark.parametrize("line, match", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"text": ' + "9" * 5000 + "}", "invalid JSON: Exceeds the limit"),
])
def test_json_that_python_cannot_hold(tmp_path, line, match):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"deep.jsonl', line 2: {match}"):
        read_jsonl(path)


def test_unreadable_data_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}])
    with mock.patch.object(Path, "read_bytes", side_effect=PermissionError(13, "Permission denied")):
        with pytest.raises(DataError, match=r"data file '.*d.jsonl' cannot be read: Permission denied"):
            read_jsonl(path)
    with pytest.raises(DataError, match=r"cannot be read: Not a directory"):
        read_jsonl(path / "inside.jsonl")  # a path through a file
    with pytest.raises(DataError, match=r"is a folder, expected a JSONL file"):
        read_jsonl(tmp_path)


def test_huge_line_is_cut_before_tokenizing(tmp_path):
    # Python-side allocation of tokenising a 4 MB line to keep 64 tokens: without the cut the
    # character tokenizer builds a 4-million-id list (> 30 MB); with it, a few kB
    record = Record("", "word " * 800_000, "mem, line 1")
    tok = CharTokenizer()
    tracemalloc.start()
    try:
        example = tokenize(record, tok, seq_len=64)
        build_dataset([record], tok, seq_len=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, f"tokenising for 64 tokens allocated {peak} bytes at peak"
    assert example.input_ids.tolist() == tok.encode("word " * 13)[:64]


class _SpyTokenizer(Tokenizer):
    """The real tokenizer, noting the longest text it was asked to encode."""

    longest = 0

    def encode(self, text, add_special_tokens=True):
        _SpyTokenizer.longest = max(_SpyTokenizer.longest, len(text))
        return super().encode(text, add_special_tokens)

    def encode_with_offsets(self, text):
        _SpyTokenizer.longest = max(_SpyTokenizer.longest, len(text))
        return super().encode_with_offsets(text)


@pytest.mark.filterwarnings("ignore:this tokenizer has no chat template")
def test_50mb_line_encodes_only_what_seq_len_needs(bundled):
    spy = _SpyTokenizer(bundled.backend, bundled.bos_token_id, bundled.eos_token_id)
    text = "Once upon a time, a cat sat on the mat. " * 1_250_000  # 50 MB
    for record in (Record("", text, "mem, line 1"), Record(text, "the end", "mem, line 2"),
                   Record("", "", "mem, line 3", ({"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": text}))):
        _SpyTokenizer.longest = 0
        example = tokenize(record, spy, seq_len=64)
        assert len(example.input_ids) == 64 and _SpyTokenizer.longest <= 64 * 64
        short = Record(record.prompt[:100_000], record.completion[:100_000], record.source,
                       tuple(dict(m, content=m["content"][:100_000]) for m in record.messages))
        assert example.input_ids.tolist() == tokenize(short, bundled, seq_len=64).input_ids.tolist()
        assert example.labels.tolist() == tokenize(short, bundled, seq_len=64).labels.tolist()


TEXT = st.lists(st.sampled_from(list("ab cd\n.,é😀") + ["the", " cat", "mat", "   "]), max_size=60).map("".join)


@settings(max_examples=150)
@given(prompt=TEXT, completion=TEXT, seq_len=st.integers(2, 40), chars_per_token=st.integers(1, 3))
def test_cutting_never_changes_the_kept_tokens(bundled, prompt, completion, seq_len, chars_per_token):
    # a tiny characters-per-token bound forces cuts (and the retries that widen them)
    records = [Record(prompt, completion, "p"), Record("", "", "c", (
        {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}))]
    for record in records:
        whole = tokenize(record, bundled, None)
        with mock.patch.object(data_module, "_CHARS_PER_TOKEN", chars_per_token):
            cut = tokenize(record, bundled, seq_len)
        assert cut.input_ids.tolist() == whole.input_ids[:seq_len].tolist()
        assert cut.labels.tolist() == whole.labels[:seq_len].tolist()
