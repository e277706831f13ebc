"""Hugging Face PEFT as the oracle for AdaLoRA: adapters cross in both directions after rank
allocation (ranks pruned, files cropped by rank_pattern) with the same logits, the allocator
makes PEFT's decisions from the same weights and gradients, the loss with the orthogonal
regulariser and the trainable-parameter line are PEFT's. Runs where torch, transformers and
peft are installed (CI installs them).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (the PEFT oracle tests need it)")
transformers = pytest.importorskip("transformers", reason="transformers not installed")
peft = pytest.importorskip("peft", reason="peft not installed (Hugging Face PEFT is the oracle)")

import minipeft as mp  # noqa: E402
from minipeft.peft import PeftModel, get_peft_model  # noqa: E402
from minipeft.peft.lowrank import adalora_allocator as allocator  # noqa: E402
from minipeft.peft.lowrank.adalora import AdaLoraConfig  # noqa: E402
from minipeft.train.optim import AdamW  # noqa: E402
from tests.peft.helpers import (  # noqa: E402
    assert_logits_close, assert_peft_saved_loads_here, hf_checkpoint, hf_model, our_logits, ours, printed,
    randomize, their_logits, token_ids,
)

SCHEDULE = dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, lora_alpha=8)
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"untied": hf_checkpoint(root / "untied"), "bias": hf_checkpoint(root / "bias", attention_bias=True)}


def pruned(pattern) -> bool:
    return any(not all(keep) for keep in pattern.values())


def test_an_adapter_trained_here_with_pruned_ranks_loads_in_peft(folders, tmp_path):
    model = get_peft_model(ours(folders["untied"]), AdaLoraConfig(**SCHEDULE, target_modules=TARGETS))
    optimizer = AdamW(model.parameter_groups(), lr=0.05)
    for step in range(SCHEDULE["total_step"]):
        model.zero_grad()
        (model(token_ids(step), labels=token_ids(step)).loss + model.regularizer()).backward()
        optimizer.step()
        model.on_step_end(step)
    pattern = model.peft_config["default"].rank_pattern
    assert pruned(pattern) and sum(map(sum, pattern.values())) == 2 * 6  # target_r · 6 modules
    expected = our_logits(model.eval(), token_ids())
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(hf_model(folders["untied"]), str(tmp_path))
    assert not [str(w.message) for w in caught if any(s in str(w.message) for s in ("nexpected", "issing"))]
    for path, rank in allocator.final_ranks(model).items():
        assert theirs.base_model.model.get_submodule(path).lora_A["default"].shape[0] == rank
    assert_logits_close(their_logits(theirs, token_ids()), expected, rtol=1e-4)


def test_an_adapter_peft_allocated_loads_here(folders, tmp_path):
    theirs = peft.get_peft_model(hf_model(folders["untied"]),
                                 peft.AdaLoraConfig(task_type="CAUSAL_LM", **SCHEDULE, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    for step in range(SCHEDULE["total_step"]):
        ids = torch.tensor(token_ids(step))
        theirs(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    assert pruned(theirs.peft_config["default"].rank_pattern)
    loaded = assert_peft_saved_loads_here(theirs, folders["untied"], tmp_path, rtol=1e-4)
    assert any(layer.lora_E["default"].data.any() for _, layer in allocator.adapted_layers(loaded, "default"))


def test_a_peft_adapter_with_a_hand_set_rank_pattern_loads_here(folders, tmp_path):
    theirs = peft.get_peft_model(hf_model(folders["bias"]), peft.AdaLoraConfig(
        task_type="CAUSAL_LM", init_r=3, total_step=10, target_modules=["k_proj", "o_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))  # E ≠ 0
    theirs.peft_config["default"].rank_pattern = {  # layer 1's k_proj keeps one rank of three
        f"model.layers.{i}.self_attn.{m}.lora_E": [i == 0, True, m == "o_proj"]
        for i in (0, 1) for m in ("k_proj", "o_proj")}
    theirs.save_pretrained(str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(hf_model(folders["bias"]), str(tmp_path))  # the cropped adapter
    loaded = PeftModel.from_pretrained(ours(folders["bias"]), tmp_path)
    assert allocator.final_ranks(loaded)["model.layers.1.self_attn.k_proj"] == 1
    assert_logits_close(our_logits(loaded, token_ids()), their_logits(reloaded, token_ids()), rtol=1e-4)


def test_the_allocator_makes_peft_s_decisions_from_the_same_weights_and_gradients(folders):
    config = dict(init_r=4, target_r=1, total_step=7, tinit=1, tfinal=2, deltaT=2, target_modules=TARGETS)
    mine = get_peft_model(ours(folders["untied"]), AdaLoraConfig(**config))
    theirs = peft.get_peft_model(hf_model(folders["untied"]), peft.AdaLoraConfig(task_type="CAUSAL_LM", **config))
    our_params = dict(mine.named_parameters())
    rng = np.random.default_rng(0)
    for step in range(9):
        for name, p in theirs.named_parameters():  # same names in both libraries
            if p.requires_grad:
                data, grad = (rng.normal(0, 1, tuple(p.shape)).astype(np.float32) for _ in range(2))
                p.data, p.grad = torch.tensor(data), torch.tensor(grad)
                our_params[name].data, our_params[name].grad = data.copy(), grad.copy()
        mine.on_step_end(step)
        theirs.base_model.update_and_allocate(step)
        expected = theirs.peft_config["default"].rank_pattern
        if expected is not None:
            assert mine.peft_config["default"].rank_pattern == {
                k.replace(".default", ""): tuple(v) for k, v in expected.items()}, f"step {step}"
        for name, p in theirs.named_parameters():
            if ".lora_E." in name:
                np.testing.assert_array_equal(our_params[name].data, p.detach().numpy(), err_msg=f"step {step}")


def test_the_loss_with_the_orthogonal_regulariser_is_peft_s(folders):
    mine = get_peft_model(ours(folders["untied"]), AdaLoraConfig(**SCHEDULE, target_modules=TARGETS))
    randomize(mine)
    theirs = peft.get_peft_model(hf_model(folders["untied"]),
                                 peft.AdaLoraConfig(task_type="CAUSAL_LM", **SCHEDULE, target_modules=TARGETS))
    our_params = dict(mine.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(torch.tensor(our_params[name].numpy()))
    ids = token_ids()
    with mp.no_grad():
        loss = (mine(ids, labels=ids).loss + mine.regularizer()).item()
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss.item()
    assert abs(loss - expected) <= 1e-5 * abs(expected)


@pytest.mark.parametrize("config", [
    dict(total_step=10),
    dict(init_r=6, target_r=3, total_step=10, target_modules="all-linear"),
    dict(init_r=2, total_step=10, target_modules=["k_proj", "o_proj"], bias="lora_only"),
], ids=["defaults", "all_linear", "bias_lora_only"])
@pytest.mark.parametrize("model_kind", ["untied", "bias"])
def test_the_trainable_parameter_line_is_peft_character_for_character(config, model_kind, folders):
    mine = printed(get_peft_model(ours(folders[model_kind]), AdaLoraConfig(**config)).print_trainable_parameters)
    theirs = printed(peft.get_peft_model(hf_model(folders[model_kind]), peft.AdaLoraConfig(**config))
                     .print_trainable_parameters)
    assert mine == theirs


def test_the_config_file_has_exactly_peft_keys():
    assert set(AdaLoraConfig(total_step=1).to_dict()) == set(peft.AdaLoraConfig(total_step=1).to_dict())
