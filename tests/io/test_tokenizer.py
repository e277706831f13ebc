"""The tokenizer wrapper: the bundled tokenizer's ids, round trips, agreement with
transformers, and how special tokens are found."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from minipeft.data import bundled_model_path
from minipeft.errors import CheckpointError, ConfigError, InputError
from minipeft.io import Tokenizer

TEXTS = [
    "Once upon a time",
    "The cat sat on the mat. It was 42 years old!",
    "Héllo café naïve façade",  # accents: pieces or byte fallback
    "I like 😀 and 中文",  # not in the 512-piece vocab: byte fallback
    "double  spaces   here",
    "  leading and trailing  ",
    "tabs\tand\nnewlines",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(bundled_model_path())


def test_bundled_special_tokens(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)
    assert tok.vocab_size == len(tok) == 512


def test_encode_adds_bos_only_when_asked(tok):
    ids = tok.encode("Once upon a time")
    assert ids[0] == 1 and 2 not in ids
    assert tok.encode("Once upon a time", add_special_tokens=False) == ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_encode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 512 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids)) == text


def test_byte_fallback_used_for_emoji(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    # "▁" piece then the 4 UTF-8 bytes of the emoji as <0xF0> <0x9F> <0x98> <0x80> (ids 3 + byte)
    assert ids[-4:] == [3 + b for b in "😀".encode("utf-8")]


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, add_special_tokens=False) == [
        tok.encode(t, add_special_tokens=False) for t in TEXTS]


def test_decode_keeps_specials_when_asked(tok):
    ids = tok.encode("Hi") + [tok.eos_token_id]
    assert tok.decode(ids) == "Hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<s> Hi</s>"


def test_bad_inputs(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(["not", "a", "string"])
    with pytest.raises(InputError, match="id 512"):
        tok.decode([1, 512])


def test_agrees_with_transformers(tok):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        pytest.skip("transformers not installed")
    hf = AutoTokenizer.from_pretrained(bundled_model_path())
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    for text in TEXTS:
        assert hf(text)["input_ids"] == tok.encode(text), text
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, False), text
        assert hf.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text))


def copy_tokenizer(tmp_path, *names):
    for name in names:
        shutil.copy(Path(bundled_model_path()) / name, tmp_path)
    return tmp_path


def test_missing_tokenizer_json_names_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"'{tmp_path}' has no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_falls_back_to_config_ids(tmp_path):
    folder = copy_tokenizer(tmp_path, "tokenizer.json", "config.json")
    tok = Tokenizer.from_pretrained(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)
    (tmp_path / "bare").mkdir()
    bare = copy_tokenizer(tmp_path / "bare", "tokenizer.json")
    assert Tokenizer.from_pretrained(bare).bos_token_id is None


def test_special_tokens_as_dicts_and_map_wins(tmp_path):
    folder = copy_tokenizer(tmp_path, "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "<s>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>"}, "pad_token": "<unk>"}))
    tok = Tokenizer.from_pretrained(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)


def test_unknown_special_token_is_an_error(tmp_path):
    folder = copy_tokenizer(tmp_path, "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ConfigError, match=r"tokenizer_config.json': pad_token '<pad>' is not in"):
        Tokenizer.from_pretrained(folder)
