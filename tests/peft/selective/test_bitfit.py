"""BitFit (BEFT): y = base(x) + b against hand NumPy, identity at b = 0, only biases get gradients,
merge == unmerged with an exact unmerge (created biases removed again), merge_and_unload declaring
the biases in the config (the folder loads back), existing biases training with ``bias``, PEFT's
defaults, file keys and config keys, config validation naming the field, and
``minipeft train --method bitfit`` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.errors import ConfigError
from minipeft.io.safetensors import read_safetensors
from minipeft.nn import Linear, Parameter
from minipeft.peft import BeftConfig, PeftModel, get_peft_model
from minipeft.peft.core import targeting
from minipeft.peft.selective.bitfit import PROJECTIONS, BeftLinear
from tests.peft.helpers import cli_runner, logits, randomize, run_layer, tiny_model, token_ids


def bitfit_count(base, config: BeftConfig) -> int:
    """The docstring's count: out per targeted Linear, + the existing biases ``bias`` trains."""
    total = 0
    for name, module in base.named_modules():
        if isinstance(module, Linear) and targeting.is_target(config, name):
            total += module.out_features
            if config.bias == "beft_only" and module.bias is not None:
                total += module.bias.size
    if config.bias == "all":
        total += sum(p.size for n, p in base.named_parameters() if n.endswith(".bias"))
    return total


def layer(seed, inp, out, bias, b=None, names=("default",)):
    """A BeftLinear on a random float64 Linear with the given added biases (one per name)."""
    rng = np.random.default_rng(seed)
    base = Linear(inp, out, bias=bias, rng=rng, dtype=np.float64)
    if bias:
        base.bias.data = rng.normal(0, 0.5, out)
    adapted = BeftLinear(base)
    for i, name in enumerate(names):
        adapted.update_layer(name, BeftConfig(), rng)
        if b is not None:
            adapted.beft_bias[name].data = np.asarray(b[i], dtype=np.float64).reshape(1, out)
    adapted.active_adapters = list(names)
    return adapted


dims = st.integers(1, 7)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), inp=dims, out=dims, bias=st.booleans())
def test_zero_biases_are_the_identity(seed, inp, out, bias):
    adapted = layer(seed, inp, out, bias)
    assert adapted.beft_bias["default"].shape == (1, out) and np.all(adapted.beft_bias["default"].data == 0)
    x = np.random.default_rng(seed).normal(size=(2, 3, inp))
    np.testing.assert_array_equal(run_layer(adapted, x), run_layer(adapted.base_layer, x))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), inp=dims, out=dims, bias=st.booleans(), n=st.integers(1, 3))
def test_the_output_is_x_w_plus_b0_plus_every_active_b(seed, inp, out, bias, n):
    rng = np.random.default_rng(seed + 1)
    bs = [rng.normal(size=out) for _ in range(n)]
    adapted = layer(seed, inp, out, bias, bs, names=tuple(f"a{i}" for i in range(n)))
    W, b0 = adapted.base_layer.weight.data, (adapted.base_layer.bias.data if bias else 0.0)
    x = rng.normal(size=(2, 3, inp))
    np.testing.assert_allclose(run_layer(adapted, x), x @ W.T + b0 + sum(bs), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), inp=dims, out=dims, bias=st.booleans(), n=st.integers(1, 3))
def test_merge_equals_unmerged_and_unmerge_restores_exactly(seed, inp, out, bias, n):
    rng = np.random.default_rng(seed + 2)
    names = tuple(f"a{i}" for i in range(n))
    bs = [rng.normal(size=out) for _ in range(n)]
    adapted = layer(seed, inp, out, bias, bs, names=names)
    W, b0 = adapted.base_layer.weight.data.copy(), (adapted.base_layer.bias.data.copy() if bias else None)
    x = rng.normal(size=(2, 3, inp))
    unmerged = run_layer(adapted, x)
    adapted.merge(list(names))
    np.testing.assert_allclose(run_layer(adapted, x), unmerged, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(adapted.base_layer.weight.data, W)  # W is never touched
    expected = sum(bs, np.zeros(out) if b0 is None else b0)  # b₀ ← b₀ + b, b₀ = 0 where there was none
    np.testing.assert_allclose(adapted.base_layer.bias.data, expected, rtol=1e-14, atol=1e-14)
    assert isinstance(adapted.base_layer.bias, Parameter) == bias  # a created b₀ is not a parameter
    adapted.merge(list(names))  # idempotent
    np.testing.assert_allclose(adapted.base_layer.bias.data, expected, rtol=1e-14, atol=1e-14)
    adapted.unmerge()
    if bias:
        np.testing.assert_array_equal(adapted.base_layer.bias.data, b0)  # bit for bit
    else:
        assert adapted.base_layer.bias is None
    assert adapted.saved_bias == {}
    np.testing.assert_array_equal(run_layer(adapted, x), unmerged)


def test_safe_merge_refuses_non_finite_biases():
    adapted = layer(0, 3, 4, True, [np.array([1.0, np.inf, 0.0, 0.0])])
    before = adapted.base_layer.bias.data.copy()
    with pytest.raises(ValueError, match="non-finite"):
        adapted.merge(["default"], safe=True)
    np.testing.assert_array_equal(adapted.base_layer.bias.data, before)
    assert adapted.merged_adapters == []


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), targets=st.sets(st.sampled_from(PROJECTIONS), min_size=1),
       attention_bias=st.booleans(), bias=st.sampled_from(["none", "beft_only", "all"]))
def test_only_biases_train_and_merge_and_unload_declares_them(seed, targets, attention_bias, bias, tmp_path_factory):
    config = BeftConfig(target_modules=sorted(targets), bias=bias)
    base = tiny_model(seed, attention_bias=attention_bias)
    peft_model = get_peft_model(tiny_model(seed, attention_bias=attention_bias), config, seed=seed)
    resolved = peft_model.peft_config["default"].bias
    assert resolved == (bias if attention_bias and (bias == "all" or targets & set(PROJECTIONS[:4])) else "none")
    assert peft_model.get_nb_trainable_parameters()[0] == bitfit_count(base, config.replace(bias=resolved))
    ids = token_ids(seed)
    np.testing.assert_array_equal(logits(peft_model, ids), logits(base, ids))  # identity at init
    peft_model(ids, labels=ids).loss.backward()
    trained = [n for n, p in peft_model.named_parameters() if p.grad is not None]
    assert trained and all(n.endswith((".beft_bias.default", ".bias")) for n in trained)
    randomize(peft_model, seed)
    peft_model.eval()
    expected = logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    np.testing.assert_allclose(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    has = {n.rsplit(".", 2)[-2] for n, _ in merged.named_parameters() if n.endswith(".bias")}
    attention, mlp = set(PROJECTIONS[:4]), set(PROJECTIONS[4:])
    assert merged.config.attention_bias == bool(attention & (targets | (attention if attention_bias else set())))
    assert merged.config.mlp_bias == bool(mlp & targets)
    assert has == (attention if merged.config.attention_bias else set()) | (mlp if merged.config.mlp_bias else set())
    folder = tmp_path_factory.mktemp("merged")
    merged.save_pretrained(folder)
    again = mp.LlamaForCausalLM.from_pretrained(folder)  # strict load: the config's biases are all in the file
    np.testing.assert_array_equal(logits(again, ids), logits(merged, ids))


def test_a_qwen2_model_trains_its_own_biases_and_merges_into_a_llama_config(tmp_path):
    base = tiny_model(model_type="qwen2")
    for name, p in base.named_parameters():
        if name.endswith(".bias"):
            p.data = np.random.default_rng(7).normal(0, 0.2, p.shape).astype(p.dtype)
    peft_model = get_peft_model(base, BeftConfig(target_modules=["v_proj", "down_proj"]))
    groups = {g.name: g.num_parameters() for g in peft_model.parameter_groups()}
    assert groups == {"bitfit:default": 2 * (16 + 32), "bias:default": 2 * 16}  # v's own b₀ trains too
    randomize(peft_model)
    for p in peft_model.bias_parameters("default"):
        p.data = p.data + 0.1
    peft_model.save_pretrained(tmp_path / "adapter")
    tensors = read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.v_proj.base_layer.bias" in tensors
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["bias"] == "beft_only"
    ids = token_ids()
    expected = logits(peft_model.eval(), ids)
    merged = peft_model.merge_and_unload()
    assert (merged.config.model_type, merged.config.attention_bias, merged.config.mlp_bias) == ("llama", True, True)
    merged.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    again = mp.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(logits(again, ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_adapter_then_unmerge_gives_the_model_back_and_disable_is_the_base():
    base = tiny_model()
    peft_model = get_peft_model(tiny_model(), BeftConfig(target_modules=["q_proj", "o_proj", "up_proj"]))
    randomize(peft_model)
    peft_model.eval()
    names = [n for n, _ in peft_model.named_parameters()]
    ids = token_ids()
    unmerged = logits(peft_model, ids)
    peft_model.merge_adapter()
    assert [n for n, _ in peft_model.named_parameters()] == names  # created biases are no parameters
    np.testing.assert_allclose(logits(peft_model, ids), unmerged, rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter():
        np.testing.assert_array_equal(logits(peft_model, ids), logits(base, ids))
    np.testing.assert_allclose(logits(peft_model, ids), unmerged, rtol=1e-5, atol=1e-5)
    peft_model.unmerge_adapter()
    assert all(m.base_layer.bias is None for m in peft_model.adapter_modules())
    restored = peft_model.unload()
    np.testing.assert_array_equal(logits(restored, ids), logits(base, ids))
    assert not any(n.endswith(".bias") for n, _ in restored.named_parameters())


def test_two_adapters_add_and_mix_per_row():
    config = BeftConfig(target_modules=["v_proj", "down_proj"])
    peft_model = get_peft_model(tiny_model(), config, adapter_name="a")
    peft_model.add_adapter("b", config)
    randomize(peft_model)
    ids = token_ids()
    peft_model.eval().set_adapter(["a", "b"])
    both = logits(peft_model, ids)
    for module in peft_model.adapter_modules():  # fold b into a: one adapter b_a + b_b
        module.beft_bias["a"].data = module.beft_bias["a"].data + module.beft_bias["b"].data
    peft_model.set_adapter("a")
    np.testing.assert_allclose(logits(peft_model, ids), both, rtol=1e-5, atol=1e-5)
    peft_model.set_adapter("b")
    only_b = logits(peft_model, ids)
    mixed = logits(peft_model, ids, adapter_names=["a", "b"])
    np.testing.assert_allclose(mixed[1], only_b[1], rtol=1e-5, atol=1e-5)
    peft_model.set_adapter("a")
    np.testing.assert_allclose(mixed[0], logits(peft_model, ids)[0], rtol=1e-5, atol=1e-5)


def test_peft_defaults_for_llama_and_the_file_layout(tmp_path):
    peft_model = get_peft_model(tiny_model(), BeftConfig())
    config = peft_model.peft_config["default"]
    assert config.target_modules == ("v_proj",) and config.bias == "none"  # no bias to train: PEFT's BEFT
    assert [g.name for g in peft_model.parameter_groups()] == ["bitfit:default"]
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names == [f"base_model.model.model.layers.{i}.self_attn.v_proj.beft_bias.default" for i in range(2)]
    peft_model.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.v_proj.beft_bias": (1, 16) for i in range(2)}
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "BEFT" and written["target_modules"] == ["v_proj"]
    assert "bias" not in written and "exclude_modules" not in written and written["init_weights"] is True
    assert BeftConfig.from_dict(written).bias == "none"  # a file without the key: PEFT's BEFT


def test_random_init_is_standard_normal_and_loads_back(tmp_path):
    peft_model = get_peft_model(tiny_model(), BeftConfig(init_weights=False, target_modules="all-linear"), seed=4)
    values = np.concatenate([m.beft_bias["default"].data.ravel() for m in peft_model.adapter_modules()])
    assert abs(values.mean()) < 0.15 and 0.85 < values.std() < 1.15  # N(0, 1), as torch.randn
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    np.testing.assert_array_equal(logits(loaded, token_ids()), logits(peft_model.eval(), token_ids()))


@pytest.mark.parametrize("kwargs, field", [
    (dict(bias="lora_only"), "bias"),
    (dict(init_weights="zeros"), "init_weights"),
    (dict(target_modules=["v_proj"], layers_to_transform=[0]), "layers_to_transform"),
    (dict(exclude_modules=["q_proj"]), "exclude_modules"),
    (dict(target_modules=7), "target_modules"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        BeftConfig(**kwargs)


def test_the_output_head_is_refused_before_anything_changes():
    model = tiny_model()
    with pytest.raises(ConfigError, match="target_modules.*lm_head"):
        get_peft_model(model, BeftConfig(target_modules=["v_proj", "lm_head"]))
    assert not any(isinstance(m, BeftLinear) for m in model.modules())


def test_cli_train_generate_merge(capsys, tmp_path):
    from tests.test_cli_train import TRAIN, small_data  # noqa: PLC0415

    cli = cli_runner(capsys)

    data, out = small_data(tmp_path, n=8), tmp_path / "run"
    steps = list(TRAIN)
    steps[1] = 2
    cli("train", "--data", data, "--out", out, "--method", "bitfit", "--target", "v_proj,up_proj", *steps)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "BEFT" and written["target_modules"] == ["up_proj", "v_proj"]
    tensors = read_safetensors(out / "adapter_model.safetensors")
    assert tensors and all(k.endswith(".beft_bias") for k in tensors)
    assert any(np.any(v != 0) for v in tensors.values())  # it trained
    adapted = cli("generate", "--adapter", out, "--prompt", "Once", "--max-new-tokens", 8)
    cli("merge", "--adapter", out, "--out", tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    assert cli("generate", "--model", tmp_path / "merged", "--prompt", "Once", "--max-new-tokens", 8) == adapted
