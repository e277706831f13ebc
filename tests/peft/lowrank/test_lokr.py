"""LoKr: LyCORIS's factorization by hand, ΔW against a direct np.kron (shapes, low-rank rules, scaling),
the Kronecker-identity forward against x ΔWᵀ, merge / unmerge, the three inits, rank and module
dropout against hand-drawn masks, config validation naming the field, PEFT's file keys, and
``minipeft train --method lokr`` end to end. PEFT itself is the oracle in test_oracle_lokr.py."""
from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.errors import ConfigError
from minipeft.io.safetensors import read_safetensors
from minipeft.nn import Linear
from minipeft.peft import LoKrConfig, PeftModel, get_peft_model
from minipeft.peft.lowrank.lokr import FACTORS, LoKrLinear, factorization
from tests.peft.helpers import cli_runner, logits, randomize, run_layer, tiny_model, token_ids


def lokr_count(base, config: LoKrConfig) -> int:
    """The docstring's count per targeted Linear (a, b) = fact(out), (c, d) = fact(in):
    (a·c, or r·(a + c) with decompose_both and r < max(a, c)/2) + (b·d, or r·(b + d) when r < max(b, d)/2)."""
    total, targets = 0, config.target_modules or ("q_proj", "v_proj")  # None: PEFT's LLaMA default
    for name, module in base.named_modules():
        if isinstance(module, Linear) and any(name.endswith("." + t) for t in targets):
            r = next((v for k, v in config.rank_pattern.items() if re.match(rf"(.*\.)?({k})$", name)), config.r)
            (a, b), (c, d) = (factorization(n, config.decompose_factor)
                              for n in (module.out_features, module.in_features))
            total += r * (a + c) if config.decompose_both and r < max(a, c) / 2 else a * c
            total += r * (b + d) if r < max(b, d) / 2 else b * d
    return total


def layer(seed, out, inp, config: LoKrConfig, r=None, names=("default",), noise=True):
    """A LoKrLinear on a random float64 Linear; with ``noise`` every factor gets N(0, 0.5²) added (ΔW ≠ 0)."""
    rng = np.random.default_rng(seed)
    adapted = LoKrLinear(Linear(inp, out, bias=True, rng=rng, dtype=np.float64), rng)
    adapted.base_layer.bias.data = rng.normal(0, 0.5, out)
    for name in names:
        adapted.update_layer(name, r or config.r, config.alpha, config, rng)
        for p in adapted.adapter_state(name).values():
            p.data = p.data + noise * rng.normal(0, 0.5, p.shape)
    adapted.active_adapters = list(names)
    return adapted


def kron_by_hand(adapted, name="default"):
    """s · np.kron(W1, W2) from the stored factors, and the whole-or-low-rank flags."""
    state = {k: p.data for k, p in adapted.adapter_state(name).items()}
    W1 = state["lokr_w1"] if "lokr_w1" in state else state["lokr_w1_a"] @ state["lokr_w1_b"]
    W2 = state["lokr_w2"] if "lokr_w2" in state else state["lokr_w2_a"] @ state["lokr_w2_b"]
    return adapted.scaling[name] * np.kron(W1, W2), "lokr_w1" in state, "lokr_w2" in state


def test_factorization_by_hand():
    # LyCORIS's docstring examples: the pair nearest √dim, smaller first; a dividing factor comes first
    assert factorization(256) == (16, 16) and factorization(128) == (8, 16) and factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32) and factorization(128, 32) == (32, 4)  # not reordered
    assert factorization(48) == (6, 8) and factorization(48, 5) == (4, 12)  # 5 does not divide: m ≤ 5
    assert factorization(1) == (1, 1) and factorization(12) == (3, 4) and factorization(2, 64) == (1, 2)


dims = st.integers(1, 24)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), out=dims, inp=dims, r=st.integers(1, 6), alpha=st.integers(1, 16),
       factor=st.sampled_from([-1, 1, 2, 3, 4, 6]), both=st.booleans())
def test_delta_weight_is_a_direct_kron_and_the_forward_uses_it(seed, out, inp, r, alpha, factor, both):
    config = LoKrConfig(r=r, alpha=alpha, decompose_factor=factor, decompose_both=both)
    adapted = layer(seed, out, inp, config)
    (a, b), (c, d) = factorization(out, factor), factorization(inp, factor)
    assert a * b == out and c * d == inp
    expected, whole_w1, whole_w2 = kron_by_hand(adapted)
    # PEFT's rule for which factor is low-rank
    assert whole_w1 == (not (both and r < max(a, c) / 2)) and whole_w2 == (r >= max(b, d) / 2)
    shapes = {k: p.shape for k, p in adapted.adapter_state("default").items()}
    assert shapes == ({"lokr_w1": (a, c)} if whole_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}) | \
        ({"lokr_w2": (b, d)} if whole_w2 else {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)})
    assert sum(math.prod(s) for s in shapes.values()) == \
        (a * c if whole_w1 else r * (a + c)) + (b * d if whole_w2 else r * (b + d))  # the docstring's count
    assert adapted.scaling["default"] == alpha / r
    np.testing.assert_allclose(adapted.delta_weight("default"), expected, rtol=1e-12, atol=1e-12)
    # the forward (Kronecker identity, ΔW never formed) equals x (W + ΔW)ᵀ + b
    x = np.random.default_rng(seed + 1).normal(size=(2, 3, inp))
    W, bias = adapted.base_layer.weight.data.copy(), adapted.base_layer.bias.data
    unmerged = run_layer(adapted, x)
    np.testing.assert_allclose(unmerged, x @ (W + expected).T + bias, rtol=1e-10, atol=1e-10)
    adapted.merge(["default"])
    np.testing.assert_allclose(adapted.base_layer.weight.data, W + expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run_layer(adapted, x), unmerged, rtol=1e-10, atol=1e-10)
    adapted.merge(["default"])  # idempotent
    adapted.unmerge()
    np.testing.assert_allclose(adapted.base_layer.weight.data, W, rtol=0, atol=1e-13)


@pytest.mark.parametrize("init, zero", [(True, {"lokr_w1", "lokr_w1_a"}), ("lycoris", {"lokr_w2", "lokr_w2_b"}),
                                        (False, set())])
@pytest.mark.parametrize("r", [1, 8])  # r = 1: W1 and W2 low-rank (decompose_both); r = 8: both whole
def test_inits_zero_what_peft_zeros_and_draw_the_rest_kaiming(init, zero, r):
    config = LoKrConfig(r=r, init_weights=init, decompose_both=True)
    adapted = layer(0, 256, 256, config, noise=False)  # (a, b) = (c, d) = (16, 16): whole iff r ≥ 8
    state = adapted.adapter_state("default")
    assert set(state) == ({"lokr_w1", "lokr_w2"} if r == 8 else {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"})
    for key, p in state.items():
        if key in zero:
            assert np.all(p.data == 0), key
        else:  # kaiming-uniform(a=√5): U(±1/√fan_in), fan_in = the second axis
            bound = 1 / math.sqrt(p.shape[1])
            assert np.all(np.abs(p.data) <= bound) and np.abs(p.data).max() > bound / 2, key
    x = np.random.default_rng(1).normal(size=(2, 3, 256))
    identity = np.array_equal(run_layer(adapted, x), run_layer(adapted.base_layer, x))
    assert identity == (init is not False)  # exact: the branch adds W1 X W2ᵀ = 0


def test_rank_dropout_drops_rows_of_delta_w_and_module_dropout_skips_the_adapter():
    x = np.random.default_rng(2).normal(size=(2, 3, 12))
    for scale in (False, True):
        adapted = layer(3, 16, 12, LoKrConfig(r=2, rank_dropout=0.5, rank_dropout_scale=scale))
        W, b = adapted.base_layer.weight.data, adapted.base_layer.bias.data
        delta = adapted.delta_weight("default")
        mask = (copy.deepcopy(adapted.rng).random(16) > 0.5).astype(np.float64)  # one draw over the out axis, as PEFT
        assert 0 < mask.sum() < 16
        if scale:
            mask /= mask.mean()
        np.testing.assert_allclose(run_layer(adapted.train(), x), x @ (W + mask[:, None] * delta).T + b, rtol=1e-10)
        np.testing.assert_allclose(run_layer(adapted.eval(), x), x @ (W + delta).T + b, rtol=1e-10)  # eval: no dropout
    adapted = layer(4, 16, 12, LoKrConfig(r=2, module_dropout=0.5))
    W, b, delta = adapted.base_layer.weight.data, adapted.base_layer.bias.data, adapted.delta_weight("default")
    outcomes = set()
    for _ in range(12):
        applied = copy.deepcopy(adapted.rng).random() > 0.5  # PEFT applies the adapter when rand > p
        outcomes.add(applied)
        np.testing.assert_allclose(run_layer(adapted.train(), x), x @ (W + applied * delta).T + b, rtol=1e-10)
    assert outcomes == {True, False}
    np.testing.assert_allclose(run_layer(adapted.eval(), x), x @ (W + delta).T + b, rtol=1e-10)


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(alpha="8"), "alpha"), (dict(rank_dropout=1.0), "rank_dropout"),
    (dict(module_dropout=-0.1), "module_dropout"), (dict(decompose_factor=0), "decompose_factor"),
    (dict(decompose_factor=-2), "decompose_factor"), (dict(decompose_both=1), "decompose_both"),
    (dict(rank_dropout_scale="yes"), "rank_dropout_scale"), (dict(use_effective_conv2d=None), "use_effective_conv2d"),
    (dict(init_weights="gaussian"), "init_weights"), (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(alpha_pattern=[1]), "alpha_pattern"), (dict(target_modules=7), "target_modules"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        LoKrConfig(**kwargs)


def test_config_file_keys_and_round_trip():
    config = LoKrConfig(r=4, alpha=2, decompose_factor=4, rank_pattern={"q_proj": 2}, init_weights="lycoris")
    written = config.to_dict()
    assert written["peft_type"] == "LOKR" and written["peft_version"] == "0.21.2"
    assert set(written) == {  # every key PEFT 0.21.2's LoKrConfig writes
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "rank_pattern", "alpha_pattern", "r", "alpha", "rank_dropout", "module_dropout",
        "use_effective_conv2d", "decompose_both", "decompose_factor", "rank_dropout_scale", "target_modules",
        "exclude_modules", "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save"}
    assert LoKrConfig.from_dict(json.loads(json.dumps(written))) == config


def test_peft_defaults_keys_and_rank_pattern_on_a_model(tmp_path):
    config = LoKrConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 8},
                        alpha_pattern={"q_proj": 6})
    peft_model = get_peft_model(tiny_model(), config)
    assert get_peft_model(tiny_model(), LoKrConfig()).peft_config["default"].target_modules == ("q_proj", "v_proj")
    layers = dict(peft_model.named_adapter_modules())
    q, down = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.mlp.down_proj"]
    assert q.scaling["default"] == 3.0 and down.r["default"] == 8 and down.scaling["default"] == 1.0
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lokr_w2_a.default" in names  # r = 2 < 8/2
    assert peft_model.get_nb_trainable_parameters()[0] == lokr_count(tiny_model(), config)
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0."
    assert tensors[prefix + "self_attn.q_proj.lokr_w1"].shape == (4, 4)  # q: 32 = 4·8 both sides
    assert tensors[prefix + "self_attn.q_proj.lokr_w2_a"].shape == (8, 2)
    assert tensors[prefix + "self_attn.q_proj.lokr_w2_b"].shape == (2, 8)
    assert tensors[prefix + "mlp.down_proj.lokr_w2"].shape == (8, 8)  # (32 → 4·8) ⊗ (48 → 6·8), r = 8 ≥ 4
    assert all(k.rsplit(".", 1)[-1] in FACTORS for k in tensors) and len(tensors) == 2 * (3 + 3 + 2)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    np.testing.assert_array_equal(logits(loaded, token_ids()), logits(peft_model.eval(), token_ids()))


def test_two_adapters_add_and_delete():
    config = LoKrConfig(r=2, target_modules=["q_proj"])
    peft_model = get_peft_model(tiny_model(), config, adapter_name="a")
    peft_model.add_adapter("b", config.replace(decompose_factor=2))
    randomize(peft_model)
    ids, base = token_ids(), logits(tiny_model(), token_ids())
    peft_model.eval().set_adapter(["a", "b"])
    both = logits(peft_model, ids)
    deltas = []
    for name in ("a", "b"):
        peft_model.set_adapter(name)
        deltas.append(logits(peft_model, ids) - base)
    assert not np.allclose(deltas[0], 0, atol=1e-3) and not np.allclose(deltas[1], 0, atol=1e-3)
    peft_model.set_adapter(["a", "b"])
    peft_model.merge_adapter()
    np.testing.assert_allclose(logits(peft_model, ids), both, rtol=1e-5, atol=1e-5)
    peft_model.unmerge_adapter()
    peft_model.delete_adapter("b")
    for module in peft_model.adapter_modules():
        assert module.adapter_names() == ["a"] and all("b" not in getattr(module, t) for t in FACTORS)


def test_cli_train_generate_merge(capsys, tmp_path):
    from tests.test_cli_train import TRAIN, small_data  # noqa: PLC0415

    cli = cli_runner(capsys)

    data, out = small_data(tmp_path, n=8), tmp_path / "run"
    steps = list(TRAIN)
    steps[1] = 2
    cli("train", "--data", data, "--out", out, "--method", "lokr", "--r", 2, "--alpha", 4,
        "--target", "q_proj,v_proj", "--lokr-decompose-factor", 4, *steps)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "LOKR" and written["decompose_factor"] == 4 and written["r"] == 2
    tensors = read_safetensors(out / "adapter_model.safetensors")
    assert tensors and all(k.rsplit(".", 1)[-1] in FACTORS for k in tensors)
    assert any(k.endswith("lokr_w1") and np.any(v != 0) for k, v in tensors.items())  # W1 = 0 at init: it trained
    adapted = cli("generate", "--adapter", out, "--prompt", "Once", "--max-new-tokens", 8)
    cli("merge", "--adapter", out, "--out", tmp_path / "merged")
    assert cli("generate", "--model", tmp_path / "merged", "--prompt", "Once", "--max-new-tokens", 8) == adapted
