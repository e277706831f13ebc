"""Hugging Face PEFT's BEFT as the oracle for BitFit: adapter files cross in both directions with the
same logits (a biased model's trained b₀ included), merge_and_unload gives PEFT's merged model
where PEFT can merge (Linears with a bias) and, where it cannot (a bias-free LLaMA), a folder
transformers loads with PEFT's unmerged logits; the trainable-parameter line and config keys are
PEFT's. Runs where torch, transformers and peft are installed (CI installs them)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.peft.helpers import (
    assert_logits_close, assert_peft_loads_ours, assert_peft_saved_loads_here, cli_runner, hf_checkpoints, hf_model,
    import_oracles, load_in_peft, our_logits, ours, peft_randomize, printed, randomize, their_logits, tiny_model,
    token_ids,
)

torch, transformers, peft = import_oracles()

from minipeft.peft import get_peft_model  # noqa: E402
from minipeft.peft.selective.bitfit import BeftConfig  # noqa: E402

MODELS = {"gqa": {}, "mha_bias": {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}}
CASES = {
    "default": ("gqa", dict()),
    "attention_and_mlp": ("gqa", dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])),
    "regex": ("mha_bias", dict(target_modules=r".*\.(k_proj|gate_proj)")),
    "all_linear_saved_head": ("gqa", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
    "biased": ("mha_bias", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
}
IDS = list(CASES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return hf_checkpoints(tmp_path_factory, MODELS)


@pytest.mark.parametrize("case", IDS)
def test_an_adapter_saved_here_loads_in_peft(case, folders, tmp_path):
    kind, config = CASES[case]
    peft_model = get_peft_model(ours(folders[kind]), BeftConfig(bias="none", **config))
    randomize(peft_model)
    assert_peft_loads_ours(peft_model, folders[kind], tmp_path)


@pytest.mark.parametrize("case", IDS)
def test_an_adapter_saved_by_peft_loads_here(case, folders, tmp_path):
    kind, config = CASES[case]
    theirs = peft.get_peft_model(hf_model(folders[kind]), peft.BeftConfig(task_type="CAUSAL_LM", **config))
    peft_randomize(theirs)
    loaded = assert_peft_saved_loads_here(theirs, folders[kind], tmp_path)
    assert loaded.peft_config["default"].bias == "none"  # PEFT's BEFT trains no existing bias


def test_trained_existing_biases_load_in_peft(folders, tmp_path):
    """bias="beft_only" on a biased model: the targeted layers' own b₀ trained and saved as
    ``...base_layer.bias``; PEFT ignores the unknown ``bias`` key (with its warning) and loads them."""
    peft_model = get_peft_model(ours(folders["mha_bias"]), BeftConfig(target_modules=["v_proj", "o_proj"]))
    assert [g.name for g in peft_model.parameter_groups()] == ["bitfit:default", "bias:default"]
    randomize(peft_model)
    for p in peft_model.bias_parameters("default"):
        p.data = p.data + 0.5
    expected = our_logits(peft_model.eval(), token_ids())
    peft_model.save_pretrained(tmp_path)
    theirs, complaints = load_in_peft(folders["mha_bias"], tmp_path)
    assert all("Unexpected keyword arguments ['bias']" in c for c in complaints)  # the config key, no tensor
    assert_logits_close(their_logits(theirs, token_ids()), expected)


def test_peft_random_init_loads_here(folders, tmp_path):
    """init_weights=False: PEFT's torch.randn biases, used as they are."""
    theirs = peft.get_peft_model(hf_model(folders["gqa"]), peft.BeftConfig(init_weights=False))
    loaded = assert_peft_saved_loads_here(theirs, folders["gqa"], tmp_path)
    assert loaded.peft_config["default"].init_weights is False


def test_merge_and_unload_gives_the_model_peft_merges(folders, tmp_path):
    """Every target has a bias, so PEFT merges too: the same b₀ + b, the same W."""
    config = dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft_model = get_peft_model(ours(folders["mha_bias"]), BeftConfig(bias="none", **config))
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    theirs = peft.PeftModel.from_pretrained(hf_model(folders["mha_bias"]), str(tmp_path / "adapter")).merge_and_unload()
    ids = token_ids()
    assert_logits_close(our_logits(merged, ids), their_logits(theirs, ids))
    assert_logits_close(their_logits(hf_model(tmp_path / "merged"), ids), their_logits(theirs, ids))
    ours_state = dict(merged.named_parameters())
    assert set(ours_state) == set(theirs.state_dict())  # no bias created: every target had one
    for name, tensor in theirs.state_dict().items():
        if name in ours_state:
            np.testing.assert_allclose(ours_state[name].data, tensor.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("case", ["default", "attention_and_mlp", "all_linear_saved_head"])
def test_merging_into_a_bias_free_llama_gives_a_folder_transformers_loads(case, folders, tmp_path):
    """PEFT refuses to merge here (no b₀); merge_and_unload creates b₀ = b and declares it in the
    config, so transformers' model of the merged folder gives PEFT's unmerged logits."""
    kind, config = CASES[case]
    peft_model = get_peft_model(ours(folders[kind]), BeftConfig(**config))
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    theirs = peft.PeftModel.from_pretrained(hf_model(folders[kind]), str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="no bias"):
        peft.PeftModel.from_pretrained(hf_model(folders[kind]), str(tmp_path / "adapter")).merge_and_unload()
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["attention_bias"] is True and written["mlp_bias"] == (case != "default")
    ids = token_ids()
    assert_logits_close(their_logits(hf_model(tmp_path / "merged"), ids), their_logits(theirs.eval(), ids))


def test_a_merged_qwen2_folder_loads_in_transformers_as_llama(tmp_path):
    """Qwen2 has q/k/v biases only; merging BEFT on down_proj needs an MLP bias, which only a llama
    config declares: the merged folder is a llama one with Qwen2's function."""
    base = tiny_model(model_type="qwen2")
    for name, p in base.named_parameters():
        if name.endswith(".bias"):
            p.data = np.random.default_rng(7).normal(0, 0.2, p.shape).astype(p.dtype)
    base.save_pretrained(tmp_path / "qwen2")
    peft_model = get_peft_model(ours(tmp_path / "qwen2"), BeftConfig(target_modules=["v_proj", "down_proj"]))
    randomize(peft_model)
    for p in peft_model.bias_parameters("default"):  # v_proj's own b₀ trained too
        p.data = p.data + 0.5
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    theirs = peft.PeftModel.from_pretrained(hf_model(tmp_path / "qwen2"), str(tmp_path / "adapter"))
    assert type(theirs.get_base_model()).__name__ == "Qwen2ForCausalLM"
    merged = hf_model(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    ids = token_ids()
    assert_logits_close(their_logits(merged, ids), their_logits(theirs.eval(), ids))


@pytest.mark.parametrize("config", [dict(), dict(target_modules="all-linear"),
                                    dict(target_modules=["q_proj"], modules_to_save=["lm_head"])],
                         ids=["default", "all_linear", "modules_to_save"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_the_trainable_parameter_line_is_peft_character_for_character(config, kind, folders):
    mine = printed(get_peft_model(ours(folders[kind]), BeftConfig(bias="none", **config)).print_trainable_parameters)
    theirs = printed(peft.get_peft_model(hf_model(folders[kind]), peft.BeftConfig(**config))
                     .print_trainable_parameters)
    assert mine == theirs


def test_the_config_file_has_exactly_peft_keys():
    assert set(BeftConfig(bias="none").to_dict()) == set(peft.BeftConfig().to_dict())
    assert set(BeftConfig().to_dict()) == set(peft.BeftConfig().to_dict()) | {"bias"}


def test_the_cli_merged_folder_loads_in_transformers(capsys, tmp_path):
    """``minipeft train --method bitfit`` then ``minipeft merge``: transformers loads the folder and
    gives the logits of PEFT running the trained adapter."""
    from tests.test_cli_train import TRAIN, small_data  # noqa: PLC0415

    cli = cli_runner(capsys)

    from minipeft.cli.common import bundled_model_path  # noqa: PLC0415

    model_dir = bundled_model_path()
    data, out = small_data(tmp_path, n=8), tmp_path / "run"
    steps = list(TRAIN)
    steps[1] = 2
    cli("train", "--data", data, "--out", out, "--method", "bitfit", "--target", "v_proj,gate_proj", *steps)
    cli("merge", "--adapter", out, "--out", tmp_path / "merged")
    theirs = peft.PeftModel.from_pretrained(hf_model(model_dir), str(out))
    ids = token_ids(vocab=512)
    assert_logits_close(their_logits(hf_model(tmp_path / "merged"), ids), their_logits(theirs.eval(), ids))
