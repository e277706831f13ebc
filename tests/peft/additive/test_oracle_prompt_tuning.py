"""Hugging Face PEFT as the oracle for prompt tuning: PROMPT_TUNING adapter files cross in both
directions with the same logits (B, P + T, V: the virtual positions included, as PEFT returns
them), also on a left-padded batch, the same greedy generations and the same
print_trainable_parameters line; TEXT init from the same tokenizer gives the same prompt table.

PEFT 0.21.2 with transformers 5.x: ``PeftModelForCausalLM.generate`` with the KV cache (the default)
looks for the cache under ``past_key_values`` while transformers passes it as ``cache``, so it puts
the P prompt vectors in front of the new token again at every step (inputs of P + 1 embeddings
after the prefill) and generates from a corrupted cache. ``use_cache=False`` (the whole sequence
each step, the prompt in front once) is PEFT's working call, and the one compared against here.
PEFT ignores position ids for prompt tuning (positions 0..P+T−1 count the padding too), so its
left-padded *generation* is not its generation of the row alone; minipeft's is (see
prompt_tuning.py's departures), and the padded *forward*, where both count 0..P+T−1, is compared.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (the PEFT oracle tests need it)")
transformers = pytest.importorskip("transformers", reason="transformers not installed")
peft = pytest.importorskip("peft", reason="peft not installed (Hugging Face PEFT is the oracle)")

import minipeft as mp  # noqa: E402
from minipeft.data import bundled_model_path  # noqa: E402
from minipeft.peft import PeftModel, get_peft_model  # noqa: E402
from minipeft.peft.additive.prompt_tuning import PromptTuningConfig  # noqa: E402
from tests.peft.helpers import (  # noqa: E402
    assert_logits_close, hf_checkpoint, hf_model, printed, randomize, token_ids,
)

P, NEW_TOKENS = 4, 8
MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # row 0 left-padded by two


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


def our_logits(model, ids, mask=None):
    with mp.no_grad():
        return model(ids, attention_mask=mask).logits.numpy()


def their_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids),
                     attention_mask=None if mask is None else torch.tensor(mask)).logits.numpy()


def their_generate(model, ids):
    """PEFT's generate without the KV cache (see the module docstring)."""
    with torch.no_grad():
        return model.generate(input_ids=torch.tensor(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              use_cache=False).numpy()


def quiet(fn):
    """``fn()``, failing on any warning about keys (unknown config keys, missing / unexpected tensors)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    complaints = [str(w.message) for w in caught if any(s in str(w.message) for s in ("nexpected", "issing", "key"))]
    assert not complaints, complaints
    return out


def test_an_adapter_saved_here_loads_in_peft(folder, tmp_path):
    ours = get_peft_model(mp.LlamaForCausalLM.from_pretrained(folder), PromptTuningConfig(num_virtual_tokens=P))
    randomize(ours)
    ours.eval()
    ids = token_ids()
    expected, padded = our_logits(ours, ids), our_logits(ours, ids, MASK)
    generated = ours.generate(ids, max_new_tokens=NEW_TOKENS)
    ours.save_pretrained(tmp_path)
    theirs = quiet(lambda: peft.PeftModel.from_pretrained(hf_model(folder), str(tmp_path)))
    assert_logits_close(their_logits(theirs, ids), expected, rtol=1e-4)
    assert_logits_close(their_logits(theirs, ids, MASK), padded, rtol=1e-4)
    np.testing.assert_array_equal(their_generate(theirs, ids), generated)
    with theirs.disable_adapter():  # the prompt matters: the base model generates something else
        assert not np.array_equal(their_generate(theirs, ids), generated)


def test_a_peft_adapter_loads_here(folder, tmp_path):
    theirs = peft.get_peft_model(hf_model(folder), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    ids = token_ids()
    expected, padded, generated = their_logits(theirs, ids), their_logits(theirs, ids, MASK), their_generate(theirs, ids)
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(folder), tmp_path)
    assert_logits_close(our_logits(ours, ids), expected, rtol=1e-4)
    assert_logits_close(our_logits(ours, ids, MASK), padded, rtol=1e-4)
    np.testing.assert_array_equal(ours.generate(ids, max_new_tokens=NEW_TOKENS), generated)
    trainable = PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(folder), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == P * 32  # PEFT refuses this; here it trains on


def test_config_keys_sizes_and_the_trainable_line_are_peft_s(folder, tmp_path):
    theirs = peft.get_peft_model(hf_model(folder), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=P))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = get_peft_model(mp.LlamaForCausalLM.from_pretrained(folder), PromptTuningConfig(num_virtual_tokens=P))
    ours.save_pretrained(tmp_path / "ours")
    read = [json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("theirs", "ours")]
    assert set(read[0]) == set(read[1])
    for key in ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules",
                "num_virtual_tokens", "prompt_tuning_init", "peft_type", "task_type", "inference_mode"):
        assert read[0][key] == read[1][key], key
    assert printed(ours.print_trainable_parameters) == printed(theirs.print_trainable_parameters)


@pytest.mark.parametrize("count", [3, 12])
def test_text_init_gives_peft_s_table(count, tmp_path):
    """Both sides tokenize the text with the bundled model's tokenizer (BOS included), cut or repeat
    it to P, and copy the word embeddings: the same table, the same logits."""
    folder = bundled_model_path()
    text = "Once upon a time"
    theirs = peft.get_peft_model(hf_model(folder), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=count, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=folder)).eval()
    ours = get_peft_model(mp.LlamaForCausalLM.from_pretrained(folder), PromptTuningConfig(
        num_virtual_tokens=count, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=folder)).eval()
    their_table = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_array_equal(ours.base_model.model.prompt_encoder.embedding["default"].numpy(), their_table)
    ids = np.array([[403, 407, 261, 378, 300]])
    assert_logits_close(our_logits(ours, ids), their_logits(theirs, ids), rtol=1e-4)
    np.testing.assert_array_equal(ours.generate(ids, max_new_tokens=NEW_TOKENS), their_generate(theirs, ids))
