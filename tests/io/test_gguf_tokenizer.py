"""Tokenizers from GGUF metadata give the ids of the ``tokenizer.json`` they describe: a
byte-level BPE (the SmolLM2 / Llama 3 / GPT-2 case, built here with ``tokenizers``) and the
bundled stories260K SentencePiece BPE; unsupported kinds are refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from minipeft.data import bundled_model_path
from minipeft.errors import CheckpointError, ConfigError, MiniPeftError
from minipeft.io import Tokenizer
from minipeft.io.gguf_tokenizer import _LLAMA3_SPLIT, tokenizer_fields_from_folder
from tests.io.gguf_helpers import tokenizer_only

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading, double  spaces   and trailing  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Héllo café naïve façade, 東京 and 🙂 emoji",
    "don't I'll we've THEY'RE",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "",
]
CORPUS = [t * 3 for t in TEXTS[:7]] + ["the quick brown fox jumps over the lazy dog " * 5,
                                        "Lily and Tom played in the park with 12 red balls."] * 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "llama-bpe": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def byte_level_folder(folder, pre: str, user_token: bool = False):
    """A small byte-level BPE tokenizer.json (trained here) with ChatML special tokens."""
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if user_token:
        tok.add_tokens(["<think>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "chat_template": TEMPLATE}))
    return folder


def assert_same_ids(gguf_tokenizer: Tokenizer, reference: tokenizers.Tokenizer, texts=TEXTS):
    for text in texts:
        for special in (True, False):
            expected = reference.encode(text, add_special_tokens=special).ids
            assert gguf_tokenizer.encode(text, add_special_tokens=special) == expected, (text, special)
        ids = reference.encode(text).ids
        assert gguf_tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_byte_level_bpe_from_gguf_matches_tokenizer_json(tmp_path, pre):
    folder = byte_level_folder(tmp_path / "tok", pre, user_token=True)
    fields = tokenizer_fields_from_folder(folder, vocab_size=512)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.tokens"][-1] == "[PAD511]"  # padded to the model's rows, as llama.cpp does
    path = tokenizer_only(tmp_path / "t.gguf", fields)
    tok = Tokenizer.from_pretrained(path)
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert_same_ids(tok, reference, TEXTS + ["I <think> so", "x<think>y"])
    expected = Tokenizer.from_pretrained(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        expected.bos_token_id, expected.eos_token_id, expected.pad_token_id)
    assert tok.chat_template == TEMPLATE


def test_byte_level_fields_as_llama_cpp_writes_them(tmp_path):
    """Metadata spelled out by hand as convert_hf_to_gguf writes it (SmolLM2's layout)."""
    folder = byte_level_folder(tmp_path / "tok", "smollm")
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    fields = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"], "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": TEMPLATE,
    }
    tok = Tokenizer.from_pretrained(tokenizer_only(tmp_path / "t.gguf", fields))
    assert_same_ids(tok, tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
    assert tok.encode("<|im_end|>") == [vocab["<|im_end|>"]]  # a control token stays whole


def test_add_bos_token_adds_bos(tmp_path):
    folder = byte_level_folder(tmp_path / "tok", "gpt2")
    fields = {**tokenizer_fields_from_folder(folder, 400), "tokenizer.ggml.add_bos_token": True}
    tok = Tokenizer.from_pretrained(tokenizer_only(tmp_path / "t.gguf", fields))
    plain = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode("hi there").ids
    assert tok.encode("hi there") == [tok.bos_token_id] + plain
    assert tok.encode("hi there", add_special_tokens=False) == plain


def test_bundled_sentencepiece_tokenizer_round_trips_through_gguf(tmp_path):
    """stories260K is a llama SentencePiece BPE (byte fallback, "▁" spaces); its GGUF export is
    tokenizer.ggml.model 'llama' with scores and token types, and reads back to the same ids."""
    folder = Path(bundled_model_path())
    fields = tokenizer_fields_from_folder(folder, vocab_size=512)
    assert fields["tokenizer.ggml.model"] == "llama"
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256  # <unk>, <s>, </s>, <0x00>..<0xFF>
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is True
    tok = Tokenizer.from_pretrained(tokenizer_only(tmp_path / "t.gguf", fields))
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert_same_ids(tok, reference)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.decode(tok.encode("Lily saw a dog.")) == "Lily saw a dog."


@pytest.mark.parametrize("field, value, match", [
    ("tokenizer.ggml.model", "bert", "tokenizer.ggml.model is 'bert'"),
    ("tokenizer.ggml.pre", "deepseek-llm", "tokenizer.ggml.pre is 'deepseek-llm'"),
    ("tokenizer.ggml.bos_token_id", 10**6, "bos_token_id 1000000 is not a token id"),
])
def test_unsupported_tokenizers_are_refused_by_name(tmp_path, field, value, match):
    folder = byte_level_folder(tmp_path / "tok", "gpt2")
    fields = {**tokenizer_fields_from_folder(folder, 400), field: value}
    with pytest.raises(CheckpointError, match=match):
        Tokenizer.from_pretrained(tokenizer_only(tmp_path / "t.gguf", fields))


def test_a_gguf_without_tokenizer_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer"):
        Tokenizer.from_pretrained(tokenizer_only(tmp_path / "t.gguf", {"general.name": "x"}))


def test_export_refuses_a_pre_tokenizer_llama_cpp_has_no_name_for(tmp_path):
    folder = byte_level_folder(tmp_path / "tok", "gpt2")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="Whitespace"):
        tokenizer_fields_from_folder(folder, 400)


@pytest.fixture(scope="module")
def small_tokenizer_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    folder = byte_level_folder(root / "tok", "smollm")
    return tokenizer_only(root / "t.gguf", tokenizer_fields_from_folder(folder, 400))


@settings(max_examples=300)
@given(data=st.data())
def test_a_mutated_tokenizer_header_loads_or_raises_minipeft_errors(small_tokenizer_gguf, data):
    buffer = bytearray(small_tokenizer_gguf.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        buffer[data.draw(st.integers(0, len(buffer) - 1))] = data.draw(st.integers(0, 255))
    path = small_tokenizer_gguf.with_name("mutated.gguf")
    path.write_bytes(bytes(buffer))
    try:
        tok = Tokenizer.from_pretrained(path)
    except MiniPeftError:
        return
    tok.decode(tok.encode("Lily had 12 red balls <|im_end|>"))
