"""Hugging Face PEFT as the oracle for LoKr: PEFT's factorization() over a range of dimensions and
factors, adapter files crossing in both directions with the same logits (whole and low-rank
factors, decompose_both, decompose_factor, rank / alpha patterns), merge_and_unload equal to
PEFT's, the same parameter shapes, the trainable-parameter line and the config keys. Runs where
torch, transformers and peft are installed (CI installs them)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.peft.helpers import (
    assert_logits_close, assert_peft_saved_loads_here, hf_checkpoint, hf_model, import_oracles, load_in_peft,
    our_logits, ours, peft_randomize, printed, randomize, their_logits, token_ids,
)

torch, transformers, peft = import_oracles()

from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

from minipeft.peft import LoKrConfig, get_peft_model  # noqa: E402
from minipeft.peft.lowrank.lokr import factorization  # noqa: E402

# TINY: hidden 32 = 4·8, intermediate 48 = 6·8, k/v out 16 = 4·4
CASES = {
    "default": dict(),  # r = 8: W1 and W2 whole on q, v
    "low_rank_w2": dict(r=2, alpha=5, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "decompose_both": dict(r=1, alpha=2, decompose_both=True, target_modules=["q_proj", "k_proj", "gate_proj"]),
    "decompose_factor": dict(r=2, decompose_factor=4, target_modules="all-linear"),
    "patterns_lycoris": dict(r=2, alpha=4, init_weights="lycoris", rank_pattern={"o_proj": 8},
                             alpha_pattern={r"layers\.1\.self_attn\.o_proj": 3},
                             target_modules=["o_proj", "down_proj"]),
}
IDS = list(CASES)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


def test_factorization_is_peft_s():
    for dimension in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 500):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize("case", IDS)
def test_an_adapter_saved_here_loads_in_peft(case, folder, tmp_path):
    peft_model = get_peft_model(ours(folder), LoKrConfig(**CASES[case]))
    randomize(peft_model)  # W1 ≠ 0 (W2 ≠ 0 with "lycoris"): ΔW ≠ 0
    expected = our_logits(peft_model.eval(), token_ids())
    peft_model.save_pretrained(tmp_path)
    theirs, complaints = load_in_peft(folder, tmp_path)
    assert not complaints
    their = their_logits(theirs, token_ids())
    assert not np.allclose(their, their_logits(hf_model(folder), token_ids()), atol=1e-3)  # the adapter acts
    assert_logits_close(their, expected)


@pytest.mark.parametrize("case", IDS)
def test_an_adapter_saved_by_peft_loads_here(case, folder, tmp_path):
    theirs = peft.get_peft_model(hf_model(folder), peft.LoKrConfig(task_type="CAUSAL_LM", **CASES[case]))
    peft_randomize(theirs)
    assert_peft_saved_loads_here(theirs, folder, tmp_path)
    # the same parameters under the same names and shapes, in memory
    their_shapes = {n: tuple(p.shape) for n, p in theirs.named_parameters() if "lokr_" in n}
    mine = get_peft_model(ours(folder), LoKrConfig(**CASES[case]))
    assert {n: p.shape for n, p in mine.named_parameters() if "lokr_" in n} == their_shapes


@pytest.mark.parametrize("case", ["low_rank_w2", "decompose_factor"])
def test_merge_and_unload_gives_the_model_peft_merges(case, folder, tmp_path):
    peft_model = get_peft_model(ours(folder), LoKrConfig(**CASES[case]))
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")  # a folder transformers loads
    theirs = peft.PeftModel.from_pretrained(hf_model(folder), str(tmp_path / "adapter")).merge_and_unload()
    ids = token_ids()
    assert_logits_close(our_logits(merged, ids), their_logits(theirs, ids))
    assert_logits_close(their_logits(hf_model(tmp_path / "merged"), ids), their_logits(theirs, ids))
    ours_state = dict(merged.named_parameters())
    for name, tensor in theirs.state_dict().items():  # W + s (W1 ⊗ W2), element by element
        if name in ours_state:
            np.testing.assert_allclose(ours_state[name].data, tensor.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("case", IDS)
def test_the_trainable_parameter_line_is_peft_character_for_character(case, folder):
    mine = printed(get_peft_model(ours(folder), LoKrConfig(**CASES[case])).print_trainable_parameters)
    theirs = printed(peft.get_peft_model(hf_model(folder), peft.LoKrConfig(**CASES[case])).print_trainable_parameters)
    assert mine == theirs


def test_the_config_file_has_exactly_peft_keys():
    assert set(LoKrConfig().to_dict()) == set(peft.LoKrConfig().to_dict())
    written = LoKrConfig(r=3, decompose_factor=4, init_weights="lycoris").to_dict()
    assert peft.LoKrConfig.from_peft_type(**written).decompose_factor == 4
