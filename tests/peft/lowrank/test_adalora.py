"""AdaLoRA (minipeft/peft/adalora.py, adalora_allocator.py): the config, ΔW, the orthogonal
regulariser, the importance scores, the budget schedule and masking, the files, the rank
picture, and ``minipeft train --method adalora``. Properties are drawn by hypothesis; every
expected value is written out here from REFERENCE 1.8, not taken from the code under test.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.autograd import Tensor
from minipeft.cli import main
from minipeft.errors import ConfigError
from minipeft.io import read_safetensors
from minipeft.peft import PeftModel, get_peft_model
from minipeft.peft.lowrank import adalora_allocator as allocator
from minipeft.peft.lowrank import adalora_plot
from minipeft.peft.lowrank.adalora import AdaLoraConfig, AdaLoraLayer
from minipeft.train import Trainer, TrainingArguments
from minipeft.train.data import Dataset, Example
from minipeft.train.optim import AdamW
from tests.peft.helpers import TINIER, assert_grads_match_fd, logits, randomize, tiny_model, token_ids

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO = Path(__file__).resolve().parents[3]


def adalora(seed=0, dtype=np.float32, size=None, **config):
    config = {"init_r": 4, "target_r": 2, "total_step": 10, "target_modules": ["q_proj", "v_proj"], **config}
    base = tiny_model(seed, dtype=dtype, **({"size": size} if size else {}))
    return get_peft_model(base, AdaLoraConfig(**config), seed=seed)


def layers(peft_model, name="default"):
    return [layer for _, layer in allocator.adapted_layers(peft_model, name)]


def expected_budget(t, init_bgt, target_bgt, tinit, tfinal, T, deltaT):
    """REFERENCE 1.8, written out: (budget, mask?)."""
    if t <= tinit:
        return init_bgt, False
    if t > T - tfinal:
        return target_bgt, True
    return int((init_bgt - target_bgt) * (1 - (t - tinit) / (T - tfinal - tinit)) ** 3 + target_bgt), t % deltaT == 0


def synthetic_step(peft_model, rng, name="default"):
    """Every A, E, B gets new random values (as an optimizer step would) and a random gradient."""
    for layer in layers(peft_model, name):
        for p in layer.adapter_state(name).values():
            p.data = rng.normal(0, 1, p.shape).astype(p.dtype)
            p.grad = rng.normal(0, 1, p.shape).astype(p.dtype)


# ----- config -------------------------------------------------------------------------------
def test_config_defaults_are_peft_s():
    c = AdaLoraConfig(total_step=100)
    assert (c.target_r, c.init_r, c.tinit, c.tfinal, c.deltaT, c.beta1, c.beta2, c.orth_reg_weight) == \
        (8, 12, 0, 0, 1, 0.85, 0.85, 0.5)
    assert (c.lora_alpha, c.lora_dropout, c.rank_pattern, c.use_dora) == (8, 0.0, None, False)
    assert get_peft_model(tiny_model(), c).peft_config["default"].target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("fields, named", [
    ({}, "total_step"), ({"total_step": 0}, "total_step"), ({"total_step": 10, "tinit": 6, "tfinal": 4}, "tinit"),
    ({"total_step": 10, "use_dora": True}, "use_dora"), ({"total_step": 10, "beta1": 1.0}, "beta1"),
    ({"total_step": 10, "orth_reg_weight": -1}, "orth_reg_weight"), ({"total_step": 10, "deltaT": 0}, "deltaT"),
    ({"total_step": 10, "rank_pattern": {"q_proj.lora_E": [1, 2]}}, "rank_pattern"),
])
def test_bad_configs_name_the_field(fields, named):
    with pytest.raises(ConfigError, match=named):
        AdaLoraConfig(**fields)


def test_r_is_ignored_with_a_warning_as_in_peft():
    with pytest.warns(UserWarning, match="init_r"):
        AdaLoraConfig(total_step=5, r=4)


# ----- ΔW and the forward ---------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), init_r=st.integers(1, 6), alpha=st.sampled_from([1.0, 8.0, 32.0]))
def test_delta_weight_and_forward_are_the_svd_form(seed, init_r, alpha):
    peft_model = adalora(seed, dtype=np.float64, init_r=init_r, lora_alpha=alpha, target_modules=["v_proj"]).eval()
    randomize(peft_model, seed)
    layer = layers(peft_model)[0]
    A, E, B = (layer.adapter_state("default")[k].data for k in ("lora_A", "lora_E", "lora_B"))
    expected = B @ (A * E) * alpha / (init_r + 1e-5)
    np.testing.assert_allclose(layer.delta_weight("default"), expected, rtol=1e-12)
    x = np.random.default_rng(seed).normal(size=(2, 3, A.shape[1]))
    W = layer.base_layer.weight.data
    np.testing.assert_allclose(layer(Tensor(x)).data, x @ (W + expected).T, rtol=1e-10, atol=1e-12)


def test_init_is_e_zero_and_small_gaussian_factors():
    layer = layers(adalora(init_r=12, target_modules=["gate_proj"]))[0]
    state = layer.adapter_state("default")
    assert not state["lora_E"].data.any() and state["lora_E"].shape == (12, 1)
    for key in ("lora_A", "lora_B"):
        assert abs(state[key].data.std() - 0.02) < 0.003 and abs(state[key].data.mean()) < 0.003
    assert float(layer.ranknum["default"].data[0]) == 12 and not layer.ranknum["default"].requires_grad


# ----- the orthogonal regulariser ---------------------------------------------------------------
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), weight=st.sampled_from([0.1, 0.5, 2.0]))
def test_regularizer_is_the_mean_frobenius_distance_to_orthogonality(seed, weight):
    peft_model = adalora(seed, dtype=np.float64, orth_reg_weight=weight, target_modules=["q_proj", "down_proj"])
    randomize(peft_model, seed)
    norms = []
    for layer in layers(peft_model):
        A, B = layer.lora_A["default"].data, layer.lora_B["default"].data
        norms += [np.linalg.norm(A @ A.T - np.eye(len(A))), np.linalg.norm(B.T @ B - np.eye(B.shape[1]))]
    assert len(norms) == 8
    np.testing.assert_allclose(peft_model.regularizer().item(), weight * np.mean(norms), rtol=1e-12)


def test_regularizer_gradient_equals_finite_differences():
    peft_model = adalora(dtype=np.float64, size=TINIER, init_r=3, target_modules=["q_proj", "up_proj"])
    randomize(peft_model)
    params = [p for layer in layers(peft_model) for k, p in layer.adapter_state("default").items() if k != "lora_E"]
    assert_grads_match_fd(peft_model.regularizer, params)


def test_no_regularizer_when_its_weight_is_zero():
    assert adalora(orth_reg_weight=0.0).regularizer() is None


# ----- importance ----------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 4), beta1=st.sampled_from([0.5, 0.85]),
       beta2=st.sampled_from([0.3, 0.85]))
def test_triplet_scores_from_synthetic_gradients(seed, steps, beta1, beta2):
    peft_model = adalora(seed, dtype=np.float64, beta1=beta1, beta2=beta2, target_modules=["k_proj"])
    layer, rng = layers(peft_model)[0], np.random.default_rng(seed)
    ipt_bar, unc_bar = {}, {}
    for _ in range(steps):
        synthetic_step(peft_model, rng)
        allocator.update_importance(layer, "default", beta1, beta2)
        for key, p in layer.adapter_state("default").items():  # eq. 8-9 by hand, element by element
            ipt = np.abs(p.data * p.grad)
            ipt_bar[key] = beta1 * ipt_bar.get(key, 0) + (1 - beta1) * ipt
            unc_bar[key] = beta2 * unc_bar.get(key, 0) + (1 - beta2) * np.abs(ipt - ipt_bar[key])
    s = {k: ipt_bar[k] * unc_bar[k] for k in ipt_bar}
    r = s["lora_E"].shape[0]
    expected = [s["lora_E"][i, 0] + np.mean(s["lora_A"][i, :]) + np.mean(s["lora_B"][:, i]) for i in range(r)]
    np.testing.assert_allclose(allocator.triplet_scores(layer, "default"), expected, rtol=1e-12)


# ----- the budget and the masks ---------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), init_r=st.integers(2, 6), target_r=st.integers(0, 3), tinit=st.integers(0, 3),
       tfinal=st.integers(0, 3), span=st.integers(1, 8), deltaT=st.integers(1, 3))
def test_budget_follows_the_cubic_schedule_and_masks_exactly_init_minus_budget(
        seed, init_r, target_r, tinit, tfinal, span, deltaT):
    target_r = min(target_r, init_r - 1)
    T = tinit + tfinal + span
    peft_model = adalora(seed, init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, total_step=T,
                         deltaT=deltaT, target_modules=["q_proj", "v_proj", "up_proj"])
    n, rng = 6, np.random.default_rng(seed)
    init_bgt, target_bgt = init_r * n, target_r * n
    final = None
    for step in range(T + 3):  # a few steps past T as well
        synthetic_step(peft_model, rng)
        budget, mask = expected_budget(step, init_bgt, target_bgt, tinit, tfinal, T, deltaT)
        assert allocator.budget_schedule(step, init_bgt, target_bgt, peft_model.peft_config["default"]) == \
            (budget, mask)
        peft_model.on_step_end(step)
        zeros = sum(int((layer.lora_E["default"].data == 0).sum()) for layer in layers(peft_model))
        pattern = peft_model.peft_config["default"].rank_pattern
        if step > T - tfinal:  # the final pattern, re-applied
            assert pattern == final and zeros == init_bgt - target_bgt
        elif mask or step == T - tfinal:  # random scores are distinct: exactly init_bgt - budget pruned
            assert zeros == init_bgt - budget and sum(map(sum, pattern.values())) == budget
            final = pattern
        else:
            assert zeros == 0


def test_pruned_singular_values_stay_zero_after_the_final_allocation_while_training():
    peft_model = adalora(init_r=4, target_r=1, tinit=1, tfinal=4, total_step=8, target_modules=ALL)
    randomize(peft_model)
    optimizer = AdamW(peft_model.parameter_groups(), lr=0.05)
    for step in range(10):
        peft_model.zero_grad()
        (peft_model(token_ids(), labels=token_ids()).loss + peft_model.regularizer()).backward()
        optimizer.step()  # Adam's momentum would move every E again...
        peft_model.on_step_end(step)
        if step >= 4:  # ...but from T - tfinal on the final pattern holds
            pattern = peft_model.peft_config["default"].rank_pattern
            for path, layer in allocator.adapted_layers(peft_model, "default"):
                E = layer.lora_E["default"].data[:, 0]
                keep = np.array(pattern[f"{path}.lora_E"])
                assert not E[~keep].any() and E[keep].all()
            assert sum(map(sum, pattern.values())) == 1 * len(ALL) * 2
            assert not any(layer.importance for layer in layers(peft_model))  # averages dropped, as PEFT


def test_a_budget_not_below_the_initial_one_prunes_nothing():
    peft_model = adalora(init_r=3, target_r=3, total_step=4)  # PEFT's kthvalue(k=0) would raise here
    rng = np.random.default_rng(0)
    for step in range(4):
        synthetic_step(peft_model, rng)
        peft_model.on_step_end(step)
    assert all(all(v) for v in peft_model.peft_config["default"].rank_pattern.values())


def test_skipping_the_final_allocation_is_an_error_not_a_guess():
    peft_model = adalora(init_r=3, target_r=1, total_step=4, tfinal=2)
    synthetic_step(peft_model, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="no rank_pattern after the final allocation"):
        peft_model.on_step_end(3)


# ----- files ------------------------------------------------------------------------------------------
def allocated(seed=0, **config):
    """An adapter after a full synthetic allocation: some ranks pruned (one module to rank 0 or more)."""
    config = {"init_r": 4, "target_r": 1, "total_step": 6, "tfinal": 1, "target_modules": ["q_proj", "v_proj"],
              **config}
    peft_model = adalora(seed, **config)
    rng = np.random.default_rng(seed)
    for step in range(config["total_step"]):
        synthetic_step(peft_model, rng)
        peft_model.on_step_end(step)
    return peft_model.eval()


def test_saving_crops_to_the_kept_ranks_and_loading_rebuilds_them(tmp_path):
    peft_model = allocated()
    pattern = peft_model.peft_config["default"].rank_pattern
    expected = logits(peft_model, token_ids())
    peft_model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"] == {k: list(v) for k, v in pattern.items()}
    tensors = read_safetensors(tmp_path / "a" / "adapter_model.safetensors")
    for key, keep in pattern.items():
        path, r = "base_model.model." + key[:-len(".lora_E")], sum(keep)
        assert tensors[f"{path}.lora_A"].shape[0] == tensors[f"{path}.lora_E"].shape[0] == r
        assert tensors[f"{path}.lora_B"].shape[1] == r
    assert not any(k.endswith("ranknum") for k in tensors)
    loaded = PeftModel.from_pretrained(tiny_model(0), tmp_path / "a")
    np.testing.assert_allclose(logits(loaded, token_ids()), expected, rtol=1e-6, atol=1e-6)
    assert allocator.final_ranks(loaded) == allocator.final_ranks(peft_model)
    assert all(float(layer.ranknum["default"].data[0]) == 4 for layer in layers(loaded))  # the scale survives
    loaded.save_pretrained(tmp_path / "b")  # saving a cropped adapter again changes nothing
    again = read_safetensors(tmp_path / "b" / "adapter_model.safetensors")
    assert all(np.array_equal(again[k], v) for k, v in tensors.items()) and set(again) == set(tensors)


def test_the_model_in_memory_keeps_every_rank_while_the_file_is_cropped(tmp_path):
    peft_model = allocated()
    peft_model.save_pretrained(tmp_path)
    assert all(layer.lora_A["default"].shape[0] == 4 for layer in layers(peft_model))


def test_the_averages_are_saved_while_allocating_and_read_back(tmp_path):
    peft_model = adalora(init_r=3, target_r=1, total_step=6, tinit=3)
    rng = np.random.default_rng(0)
    for step in range(2):  # still before the first mask: every rank kept, no rank_pattern yet
        synthetic_step(peft_model, rng)
        peft_model.on_step_end(step)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / allocator.STATE_FILE).exists()
    loaded = PeftModel.from_pretrained(tiny_model(0), tmp_path, is_trainable=True)
    for mine, theirs in zip(layers(peft_model), layers(loaded)):
        for key, (ipt, unc) in mine.importance["default"].items():
            np.testing.assert_array_equal(theirs.importance["default"][key][0], ipt)
            np.testing.assert_array_equal(theirs.importance["default"][key][1], unc)
    done = allocated()  # after the final allocation the averages are gone, and so is the file
    done.save_pretrained(tmp_path)
    assert not (tmp_path / allocator.STATE_FILE).exists()


# ----- the trainer drives it ---------------------------------------------------------------------------
def test_the_trainer_adds_the_regularizer_and_allocates_after_each_update(tmp_path):
    peft_model = adalora(init_r=3, target_r=1, total_step=6, tinit=1, tfinal=2, target_modules=["q_proj", "o_proj"])
    rng = np.random.default_rng(0)
    examples = [Example(ids, ids.copy(), f"row {i}") for i, ids in enumerate(rng.integers(0, 96, (8, 6)))]
    seen = []
    original = peft_model.on_step_end

    def spy(step):  # the gradients of the update must still be there when the allocator runs
        seen.append((step, all(p.grad is not None for g in peft_model.parameter_groups() for p in g.params)))
        original(step)

    peft_model.on_step_end = spy
    args = TrainingArguments(output_dir=tmp_path, max_steps=6, batch_size=4, lr=0.02, seq_len=6, save_every=0,
                             eval_every=0, progress=False)
    Trainer(peft_model, args, Dataset(examples, pad_id=0, seq_len=6)).train()
    assert seen == [(s, True) for s in range(6)]
    assert sum(map(sum, peft_model.peft_config["default"].rank_pattern.values())) == 4  # target_r · 4 modules


@pytest.mark.parametrize("tfinal, stop", [(0, 3), (2, 6), (2, 7)])  # mid-allocation; before / after the final one
def test_a_resumed_run_allocates_exactly_as_an_uninterrupted_one(tmp_path, tfinal, stop):
    rng = np.random.default_rng(1)
    examples = [Example(ids, ids.copy(), f"row {i}") for i, ids in enumerate(rng.integers(0, 96, (12, 6)))]
    config = dict(init_r=3, target_r=1, total_step=8, tinit=1, tfinal=tfinal, target_modules=["q_proj", "o_proj"])

    def trainer(folder, model):
        args = TrainingArguments(output_dir=folder, max_steps=8, batch_size=4, lr=0.02, seq_len=6, save_every=1,
                                 keep_checkpoints=None, eval_every=0, progress=False)
        return Trainer(model, args, Dataset(examples, pad_id=0, seq_len=6))

    straight = adalora(**config)
    trainer(tmp_path / "a", straight).train()
    shutil.copytree(tmp_path / "a" / f"checkpoint-{stop}", tmp_path / "b" / f"checkpoint-{stop}")
    (tmp_path / "b" / "latest").write_text(f"checkpoint-{stop}\n")
    resumed = adalora(**config)
    trainer(tmp_path / "b", resumed).train(resume=True)
    assert resumed.peft_config["default"].rank_pattern == straight.peft_config["default"].rank_pattern
    for mine, theirs in zip(layers(resumed), layers(straight)):
        for key, p in mine.adapter_state("default").items():
            np.testing.assert_array_equal(p.data, theirs.adapter_state("default")[key].data, err_msg=key)
        assert mine.importance.keys() == theirs.importance.keys() == ({"default"} if tfinal == 0 else set())
        for key, pair in mine.importance.get("default", {}).items():  # tfinal = 0: still allocating at the end
            for got, expected in zip(pair, theirs.importance["default"][key]):
                np.testing.assert_array_equal(got, expected, err_msg=key)


# ----- the picture and the command line ----------------------------------------------------------------
def test_rank_grid_rows_are_projections_and_columns_layers(tmp_path):
    ranks = {"model.layers.1.self_attn.q_proj": 3, "model.layers.0.mlp.down_proj": 0,
             "model.layers.0.self_attn.q_proj": 5}
    rows, cols, grid = adalora_plot.rank_grid(ranks)
    assert rows == ["q_proj", "down_proj"] and cols == [0, 1] and grid == [[5, 3], [0, None]]
    assert "total rank 8 over 3 modules" in adalora_plot.rank_table(ranks)
    pytest.importorskip("matplotlib", reason="matplotlib not installed (the heat map is optional)")
    assert adalora_plot.plot_ranks(ranks, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_trains_adalora_and_reports_the_ranks(capsys, tmp_path):
    lines = (REPO / "examples" / "data" / "zoe_stories.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "--data", tmp_path / "d.jsonl", "--out", out, "--method", "adalora", "--steps", 5,
            "--batch-size", 4, "--seq-len", 64, "--save-every", 0, "--eval-every", 0, "--warmup", 0,
            "--init-r", 4, "--target-r", 2, "--tinit", 1, "--tfinal", 1, "--delta-t", 1, "--target", "q_proj,v_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(a) for a in argv]) == 0
    stdout = capsys.readouterr().out
    assert "total rank 20 over 10 modules (mean 2.00)" in stdout  # 5 layers x q, v at target_r 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 5 and config["rank_pattern"]
    assert (out / "adalora_ranks.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_layers_are_adalora_layers_and_only_linears_are_targets():
    assert all(isinstance(layer, AdaLoraLayer) for layer in layers(adalora()))
    with pytest.raises(ConfigError, match="AdaLoRA adapts only"):
        adalora(target_modules=["embed_tokens"])
