"""Hugging Face PEFT as the oracle for IA3: adapter files cross in both directions with the same
logits, merge_and_unload gives PEFT's merged model, two active adapters multiply as in PEFT, and
the trainable-parameter line and config keys are PEFT's. Runs where torch, transformers and peft
are installed (CI installs them)."""
from __future__ import annotations


import numpy as np
import pytest

from tests.peft.helpers import (
    assert_logits_close, assert_peft_loads_ours, assert_peft_saved_loads_here, hf_checkpoints, hf_model,
    import_oracles, our_logits, ours, peft_randomize, printed, randomize, their_logits, token_ids,
)

torch, transformers, peft = import_oracles()

from minipeft.peft import PeftModel, get_peft_model  # noqa: E402
from minipeft.peft.additive.ia3 import IA3Config  # noqa: E402

MODELS = {"gqa": {}, "mha_bias": {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}}
CASES = {
    "default": ("gqa", dict()),
    "explicit": ("gqa", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "bias_attention_and_mlp": ("mha_bias", dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                                                feedforward_modules=["o_proj", "down_proj"])),
    "regex": ("mha_bias", dict(target_modules=r".*\.(k_proj|gate_proj|up_proj)",
                               feedforward_modules=r".*\.1\.mlp\.up_proj")),
    "all_linear_saved_head": ("gqa", dict(target_modules="all-linear", feedforward_modules=["down_proj"],
                                          modules_to_save=["lm_head"])),
}
IDS = list(CASES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return hf_checkpoints(tmp_path_factory, MODELS)


@pytest.mark.parametrize("case", IDS)
def test_an_adapter_saved_here_loads_in_peft(case, folders, tmp_path):
    kind, config = CASES[case]
    peft_model = get_peft_model(ours(folders[kind]), IA3Config(**config))
    randomize(peft_model)
    assert_peft_loads_ours(peft_model, folders[kind], tmp_path)


@pytest.mark.parametrize("case", IDS)
def test_an_adapter_saved_by_peft_loads_here(case, folders, tmp_path):
    kind, config = CASES[case]
    theirs = peft.get_peft_model(hf_model(folders[kind]), peft.IA3Config(task_type="CAUSAL_LM", **config))
    peft_randomize(theirs)
    assert_peft_saved_loads_here(theirs, folders[kind], tmp_path)


def test_peft_random_init_loads_here(folders, tmp_path):
    """init_ia3_weights=False: PEFT's torch.randn vectors, used as they are."""
    theirs = peft.get_peft_model(hf_model(folders["gqa"]), peft.IA3Config(init_ia3_weights=False))
    loaded = assert_peft_saved_loads_here(theirs, folders["gqa"], tmp_path)
    assert loaded.peft_config["default"].init_ia3_weights is False


@pytest.mark.parametrize("case", ["explicit", "bias_attention_and_mlp"])
def test_merge_and_unload_gives_the_model_peft_merges(case, folders, tmp_path):
    kind, config = CASES[case]
    peft_model = get_peft_model(ours(folders[kind]), IA3Config(**config))
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")  # a folder transformers loads
    theirs = peft.PeftModel.from_pretrained(hf_model(folders[kind]), str(tmp_path / "adapter")).merge_and_unload()
    ids = token_ids()
    assert_logits_close(our_logits(merged, ids), their_logits(theirs, ids))
    assert_logits_close(their_logits(hf_model(tmp_path / "merged"), ids), their_logits(theirs, ids))
    ours_state = dict(merged.named_parameters())
    for name, tensor in theirs.state_dict().items():  # the same W and b, element by element
        if name in ours_state:
            np.testing.assert_allclose(ours_state[name].data, tensor.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_two_active_adapters_multiply_as_in_peft(folders, tmp_path):
    kind, config = CASES["bias_attention_and_mlp"]
    theirs = peft.get_peft_model(hf_model(folders[kind]), peft.IA3Config(**config), adapter_name="one")
    theirs.add_adapter("two", peft.IA3Config(**config))
    peft_randomize(theirs.base_model)  # only "one" is trainable here
    theirs.base_model.set_adapter("two")
    peft_randomize(theirs.base_model, seed=6)
    theirs.save_pretrained(str(tmp_path))
    theirs.base_model.set_adapter(["one", "two"])
    expected = their_logits(theirs.eval(), token_ids())
    loaded = PeftModel.from_pretrained(ours(folders[kind]), tmp_path / "one", adapter_name="one")
    loaded.load_adapter(tmp_path / "two", adapter_name="two")
    loaded.set_adapter(["one", "two"])
    assert_logits_close(our_logits(loaded.eval(), token_ids()), expected)


@pytest.mark.parametrize("config", [dict(), dict(target_modules="all-linear", feedforward_modules=["down_proj"]),
                                    dict(target_modules=["q_proj"], modules_to_save=["lm_head"])],
                         ids=["default", "all_linear", "modules_to_save"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_the_trainable_parameter_line_is_peft_character_for_character(config, kind, folders):
    mine = printed(get_peft_model(ours(folders[kind]), IA3Config(**config)).print_trainable_parameters)
    theirs = printed(peft.get_peft_model(hf_model(folders[kind]), peft.IA3Config(**config))
                     .print_trainable_parameters)
    assert mine == theirs


def test_the_config_file_has_exactly_peft_keys_and_peft_refuses_what_we_refuse():
    assert set(IA3Config().to_dict()) == set(peft.IA3Config().to_dict())
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
