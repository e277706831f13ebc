"""Hugging Face PEFT as the oracle for prefix tuning: PREFIX_TUNING adapter files cross in both
directions, with and without the projection MLP, on a multi-head (Hkv = H) and a grouped-query
(Hkv < H) checkpoint, with the same logits and the same greedy generations.

PEFT 0.21.2 with transformers 5.x: ``PeftModelForCausalLM.generate`` with the KV cache (the default)
puts the prefix in ``past_key_values`` while transformers passes its own ``cache``, which wins
("Both `past_key_values` and `cache` are set ... ignoring deprecated `past_key_values`"), so the
prefix is silently dropped and PEFT generates the base model's text; with ``use_cache=False`` the
prefix cache built at the first step is passed again at every step and keeps the keys of the
previous steps (its length goes P, P + T, P + 2T + 1, ...), so from the second new token on each
token also attends to stale copies of the sequence. The working call, compared against here:
greedy decoding by PEFT's forward on the whole sequence at every step
(``model(input_ids=x).logits[:, -1].argmax(-1)``), which builds a fresh prefix each call
and places the tokens at P.. as PEFT's forward does.
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
from minipeft.errors import CheckpointError  # noqa: E402
from minipeft.peft import PeftModel, get_peft_model  # noqa: E402
from minipeft.peft.additive.prefix_tuning import PrefixTuningConfig  # noqa: E402
from tests.peft.helpers import (  # noqa: E402
    assert_logits_close, hf_checkpoints, hf_model, randomize, token_ids,
)

MODELS = {"mha": {"num_key_value_heads": 4}, "gqa": {"num_key_value_heads": 2}}
CASES = [(kind, projection) for kind in MODELS for projection in (False, True)]
IDS = [f"{kind}-{'projection' if projection else 'table'}" for kind, projection in CASES]
P, NEW_TOKENS = 4, 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return hf_checkpoints(tmp_path_factory, MODELS)


def our_logits(model, ids):
    with mp.no_grad():
        return model(ids).logits.numpy()


def their_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def their_generate(model, ids):
    """Greedy decoding by PEFT's forward on the whole sequence each step (see the module docstring)."""
    x = torch.tensor(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x.numpy()


def quiet(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    complaints = [str(w.message) for w in caught if any(s in str(w.message) for s in ("nexpected", "issing"))]
    assert not complaints, complaints
    return out


@pytest.mark.parametrize(("kind", "projection"), CASES, ids=IDS)
def test_an_adapter_saved_here_loads_in_peft(kind, projection, folders, tmp_path):
    ours = get_peft_model(mp.LlamaForCausalLM.from_pretrained(folders[kind]),
                          PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection))
    randomize(ours)
    ours.eval()
    ids = token_ids()
    expected, generated = our_logits(ours, ids), ours.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    ours.save_pretrained(tmp_path)
    theirs = quiet(lambda: peft.PeftModel.from_pretrained(hf_model(folders[kind]), str(tmp_path)))
    assert_logits_close(their_logits(theirs, ids), expected, rtol=1e-4)
    np.testing.assert_array_equal(their_generate(theirs, ids), generated)
    with theirs.disable_adapter():  # the prefix matters: without it the logits differ
        assert np.abs(their_logits(theirs, ids) - expected).max() > 1e-2


@pytest.mark.parametrize(("kind", "projection"), CASES, ids=IDS)
def test_a_peft_adapter_loads_here(kind, projection, folders, tmp_path):
    theirs = peft.get_peft_model(hf_model(folders[kind]), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection)).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    ids = token_ids()
    expected, generated = their_logits(theirs, ids), their_generate(theirs, ids)
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(folders[kind]), tmp_path)
    assert_logits_close(our_logits(ours, ids), expected, rtol=1e-4)
    np.testing.assert_array_equal(ours.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[]), generated)
    if projection:  # PEFT keeps no MLP in its files: training it further is refused, as PEFT refuses it
        with pytest.raises(CheckpointError, match="is_trainable"):
            PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(folders[kind]), tmp_path,
                                      is_trainable=True)


@pytest.mark.parametrize(("kind", "projection"), CASES, ids=IDS)
def test_adapter_config_has_peft_keys_and_sizes(kind, projection, folders, tmp_path):
    """Both sides write the same keys, and fill in the same sizes from the model (GQA: token_dim =
    head_dim·Hkv, num_attention_heads = Hkv)."""
    theirs = peft.get_peft_model(hf_model(folders[kind]), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = get_peft_model(mp.LlamaForCausalLM.from_pretrained(folders[kind]),
                          PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection))
    ours.save_pretrained(tmp_path / "ours")
    read = [json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("theirs", "ours")]
    assert set(read[0]) == set(read[1])
    for key in ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size",
                "num_transformer_submodules", "num_virtual_tokens", "prefix_projection", "peft_type"):
        assert read[0][key] == read[1][key], key
    kv_heads = MODELS[kind]["num_key_value_heads"]
    assert read[1]["num_attention_heads"] == kv_heads and read[1]["token_dim"] == 8 * kv_heads
    counts = theirs.get_nb_trainable_parameters()[0], ours.get_nb_trainable_parameters()[0]
    assert counts[0] == counts[1]
