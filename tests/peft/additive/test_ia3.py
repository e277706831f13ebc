"""IA3: the two equations against hand NumPy, identity at l = 1, merge == unmerged and an exact
unmerge (zeros in l included), adapters multiplying, PEFT's targeting defaults and file keys,
config validation naming the field, and ``minipeft train --method ia3`` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.errors import ConfigError
from minipeft.io.safetensors import read_safetensors
from minipeft.nn import Linear
from minipeft.peft import PeftModel, get_peft_model
from minipeft.peft.additive.ia3 import IA3Config, IA3Linear
from tests.peft.helpers import cli_runner, logits, randomize, run_layer, tiny_model, token_ids


def ia3_count(base, config: IA3Config) -> int:
    """The docstring's count: out per output-scaled target, in per feed-forward target."""
    total = 0
    for name, module in base.named_modules():
        if isinstance(module, Linear) and any(name.endswith("." + t) for t in config.target_modules):
            total += module.in_features if config.is_feedforward(name) else module.out_features
    return total


def layer(seed, inp, out, feedforward, bias=True, l=None, names=("default",)):
    """An IA3Linear on a random Linear (float64) with the given vectors l (one per name)."""
    rng = np.random.default_rng(seed)
    base = Linear(inp, out, bias=bias, rng=rng, dtype=np.float64)
    if bias:
        base.bias.data = rng.normal(0, 0.5, out)
    adapted = IA3Linear(base, feedforward)
    for i, name in enumerate(names):
        adapted.update_layer(name, IA3Config(), rng)
        if l is not None:
            adapted.ia3_l[name].data = np.asarray(l[i] if isinstance(l, list) else l, dtype=np.float64)
    adapted.active_adapters = list(names)
    return adapted


dims = st.integers(1, 7)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), inp=dims, out=dims, feedforward=st.booleans(), bias=st.booleans())
def test_all_ones_vectors_are_the_identity(seed, inp, out, feedforward, bias):
    adapted = layer(seed, inp, out, feedforward, bias)  # init_ia3_weights=True: l = 1
    shape = (1, inp) if feedforward else (out, 1)
    assert adapted.ia3_l["default"].shape == shape and np.all(adapted.ia3_l["default"].data == 1)
    x = np.random.default_rng(seed).normal(size=(2, 3, inp))
    np.testing.assert_array_equal(run_layer(adapted, x), run_layer(adapted.base_layer, x))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), inp=dims, out=dims, bias=st.booleans())
def test_each_vector_scales_what_the_equation_says(seed, inp, out, bias):
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(2, 3, inp))
    l_ff, l_out = rng.normal(size=(1, inp)), rng.normal(size=(out, 1))
    ff = layer(seed, inp, out, True, bias, l_ff)
    W, b = ff.base_layer.weight.data, (ff.base_layer.bias.data if bias else 0.0)
    np.testing.assert_allclose(run_layer(ff, x), (x * l_ff) @ W.T + b, rtol=1e-12, atol=1e-12)  # input scaled
    non_ff = layer(seed, inp, out, False, bias, l_out)
    np.testing.assert_allclose(run_layer(non_ff, x), (x @ W.T + b) * l_out[:, 0], rtol=1e-12, atol=1e-12)  # bias too


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), inp=dims, out=dims, feedforward=st.booleans(), bias=st.booleans(),
       zeros=st.integers(0, 3))
def test_merge_equals_unmerged_and_unmerge_restores_exactly(seed, inp, out, feedforward, bias, zeros):
    rng = np.random.default_rng(seed + 2)
    l = rng.normal(size=(1, inp) if feedforward else (out, 1))
    l.flat[rng.integers(0, l.size, zeros)] = 0.0  # a zero erases W's row / column in the merge
    adapted = layer(seed, inp, out, feedforward, bias, l)
    W, b = adapted.base_layer.weight.data.copy(), (adapted.base_layer.bias.data.copy() if bias else None)
    x = rng.normal(size=(2, 3, inp))
    unmerged = run_layer(adapted, x)
    adapted.merge(["default"])
    np.testing.assert_allclose(run_layer(adapted, x), unmerged, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(adapted.base_layer.weight.data, W * l, rtol=0, atol=0)  # diag(l) W or W diag(l)
    if bias:
        expected_bias = b if feedforward else b * l[:, 0]  # the input scaling never touches b
        np.testing.assert_array_equal(adapted.base_layer.bias.data, expected_bias)
    adapted.merge(["default"])  # idempotent
    adapted.unmerge()
    np.testing.assert_allclose(adapted.base_layer.weight.data, W, rtol=1e-15, atol=0)
    if bias:
        np.testing.assert_allclose(adapted.base_layer.bias.data, b, rtol=1e-15, atol=0)
    assert adapted.lost == {}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), inp=dims, out=dims, feedforward=st.booleans())
def test_active_adapters_multiply_their_vectors(seed, inp, out, feedforward):
    rng = np.random.default_rng(seed + 3)
    shape = (1, inp) if feedforward else (out, 1)
    l1, l2 = rng.normal(size=shape), rng.normal(size=shape)
    x = rng.normal(size=(2, 3, inp))
    both = layer(seed, inp, out, feedforward, True, [l1, l2], names=("a", "b"))
    product = layer(seed, inp, out, feedforward, True, l1 * l2)
    np.testing.assert_allclose(run_layer(both, x), run_layer(product, x), rtol=1e-12, atol=1e-12)
    both.merge(["a", "b"])  # merged one after the other: W * l1 * l2
    np.testing.assert_allclose(run_layer(both, x), run_layer(product, x), rtol=1e-12, atol=1e-12)


def test_two_adapters_on_a_model_multiply_and_mix_per_row():
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(tiny_model(), config, adapter_name="a")
    peft_model.add_adapter("b", config)
    randomize(peft_model)
    ids = token_ids()
    peft_model.eval().set_adapter(["a", "b"])
    both = logits(peft_model, ids)
    for path, module in peft_model.named_adapter_modules():  # fold b into a: one adapter l_a ⊙ l_b
        module.ia3_l["a"].data = module.ia3_l["a"].data * module.ia3_l["b"].data
    peft_model.set_adapter("a")
    np.testing.assert_allclose(logits(peft_model, ids), both, rtol=1e-5, atol=1e-5)
    peft_model.set_adapter("b")
    only_b = logits(peft_model, ids)
    mixed = logits(peft_model, ids, adapter_names=["a", "b"])  # row 0 adapter a, row 1 adapter b
    np.testing.assert_allclose(mixed[1], only_b[1], rtol=1e-5, atol=1e-5)
    peft_model.set_adapter("a")
    np.testing.assert_allclose(mixed[0], logits(peft_model, ids)[0], rtol=1e-5, atol=1e-5)


def test_peft_defaults_for_llama_and_the_file_layout(tmp_path):
    peft_model = get_peft_model(tiny_model(), IA3Config())
    config = peft_model.peft_config["default"]
    assert config.target_modules == ("down_proj", "k_proj", "v_proj")
    kinds = {path.rsplit(".", 1)[-1]: m.is_feedforward for path, m in peft_model.named_adapter_modules()}
    assert kinds == {"k_proj": False, "v_proj": False, "down_proj": True}
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert "base_model.model.model.layers.0.self_attn.k_proj.ia3_l.default" in names
    peft_model.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (16, 1)  # 2 kv heads · 8
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.ia3_l"].shape == (1, 48)
    assert len(tensors) == 6
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "IA3" and written["feedforward_modules"] is None  # PEFT resolves it the same
    assert "layers_to_transform" not in written and written["init_ia3_weights"] is True


def test_feedforward_matching_is_peft_rule():
    assert IA3Config(target_modules=["down_proj", "up_proj"], feedforward_modules=["down_proj"]).is_feedforward(
        "model.layers.0.mlp.down_proj")
    regex = IA3Config(target_modules=r".*(k_proj|up_proj)", feedforward_modules=r".*\.1\.mlp\.up_proj")
    assert regex.is_feedforward("model.layers.1.mlp.up_proj") and not regex.is_feedforward("model.layers.0.mlp.up_proj")
    assert IA3Config(target_modules=["q_proj"]).is_feedforward("model.layers.0.mlp.down_proj")  # None: PEFT default
    # "all-linear" resolves to full names; a short feed-forward name is still covered
    peft_model = get_peft_model(tiny_model(), IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"]))
    assert sum(m.is_feedforward for m in peft_model.adapter_modules()) == 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "feedforward_modules"),
    (dict(feedforward_modules=[3]), "feedforward_modules"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(init_ia3_weights="ones"), "init_ia3_weights"),
    (dict(target_modules=["k_proj"], layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=7), "target_modules"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        IA3Config(**kwargs)


def test_a_second_adapter_must_agree_on_feed_forward():
    peft_model = get_peft_model(tiny_model(), IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ConfigError, match="feedforward_modules"):
        peft_model.add_adapter("b", IA3Config(target_modules=["down_proj"], feedforward_modules=[]))
    assert list(peft_model.peft_config) == ["default"]


def test_random_init_is_standard_normal_and_loads_back(tmp_path):
    peft_model = get_peft_model(tiny_model(), IA3Config(init_ia3_weights=False), seed=4)
    values = np.concatenate([m.ia3_l["default"].data.ravel() for m in peft_model.adapter_modules()])
    assert abs(values.mean()) < 0.15 and 0.85 < values.std() < 1.15  # N(0, 1), as torch.randn
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    np.testing.assert_array_equal(logits(loaded, token_ids()), logits(peft_model.eval(), token_ids()))


def test_cli_train_generate_merge(capsys, tmp_path):
    from tests.test_cli_train import TRAIN, small_data  # noqa: PLC0415

    cli = cli_runner(capsys)

    data, out = small_data(tmp_path, n=8), tmp_path / "run"
    steps = list(TRAIN)
    steps[1] = 2
    cli("train", "--data", data, "--out", out, "--method", "ia3", "--target", "k_proj,v_proj,down_proj",
        "--ia3-feedforward", "down_proj", *steps)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "IA3" and written["feedforward_modules"] == ["down_proj"]
    tensors = read_safetensors(out / "adapter_model.safetensors")
    assert tensors and all(k.endswith(".ia3_l") for k in tensors)
    assert any(not np.all(v == 1) for v in tensors.values())  # it trained
    adapted = cli("generate", "--adapter", out, "--prompt", "Once", "--max-new-tokens", 8)
    cli("merge", "--adapter", out, "--out", tmp_path / "merged")
    assert cli("generate", "--model", tmp_path / "merged", "--prompt", "Once", "--max-new-tokens", 8) == adapted
