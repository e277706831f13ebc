"""LoRA (lora.py) and the PeftModel around it: the equation, scalings, inits, patterns,
dropout, named adapters, mixed batches, merging and unloading."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.autograd import Tensor, no_grad
from minipeft.errors import ConfigError
from minipeft.nn import Linear, Module
from minipeft.peft import REGISTRY, LoraConfig, PeftModel, get_peft_model, registry
from minipeft.peft.lowrank import lora
from minipeft.peft.core.base import AdapterLayer
from tests.peft.helpers import logits, printed, randomize, tiny_model, token_ids


class Block(Module):
    """One Linear (with bias) to adapt on its own."""

    def __init__(self, inp, out, seed):
        rng = np.random.default_rng(seed)
        self.proj = Linear(inp, out, bias=True, rng=rng)
        self.proj.bias.data = rng.normal(size=out)
        self.proj.to(dtype=np.float64)

    def forward(self, x):
        return self.proj(x)


def adapted_block(inp=6, out=5, seed=0, **config):
    block = Block(inp, out, seed)
    lora.apply(block, LoraConfig(target_modules=["proj"], **config), np.random.default_rng(seed + 1))
    return block


# ----- the equation and the scalings -------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(inp=st.integers(1, 9), out=st.integers(1, 9), r=st.integers(1, 6),
       alpha=st.floats(0.5, 64), rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_is_x_times_w_plus_s_b_a(inp, out, r, alpha, rslora, seed):
    block = adapted_block(inp, out, seed, r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False)
    layer = block.proj
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert layer.scaling["default"] == pytest.approx(s, rel=1e-15)
    A, B = (t.data for t in layer.factors("default"))
    W, b = layer.base_layer.weight.data, layer.base_layer.bias.data
    np.testing.assert_allclose(layer.delta_weight("default"), s * B @ A, rtol=1e-12)
    x = np.random.default_rng(seed).normal(size=(3, 2, inp))
    with no_grad():
        y = block(Tensor(x)).numpy()
    np.testing.assert_allclose(y, x @ (W + s * B @ A).T + b, rtol=1e-10, atol=1e-10)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    plain = get_peft_model(tiny_model(), LoraConfig(r=16, lora_alpha=8))
    rs = get_peft_model(tiny_model(), LoraConfig(r=16, lora_alpha=8, use_rslora=True))
    assert {m.scaling["default"] for m in plain.adapter_modules()} == {0.5}
    assert {m.scaling["default"] for m in rs.adapter_modules()} == {2.0}


def test_rank_and_alpha_patterns_set_r_and_scaling_per_module():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "v_proj": 6},
                        alpha_pattern={"q_proj": 1, "layers.0.self_attn.v_proj": 12})
    peft_model = get_peft_model(tiny_model(), config)
    got = {p: (m.r["default"], m.lora_alpha["default"], m.scaling["default"])
           for p, m in peft_model.named_adapter_modules()}
    assert got == {"model.layers.0.self_attn.q_proj": (4, 1, 0.25), "model.layers.0.self_attn.v_proj": (6, 12, 2.0),
                   "model.layers.1.self_attn.q_proj": (2, 1, 0.5), "model.layers.1.self_attn.v_proj": (6, 8, 8 / 6)}


# ----- initialisation -----------------------------------------------------------------------
def factors(peft_model, path="model.layers.0.mlp.up_proj"):
    layer = peft_model.base_model.model.get_submodule(path)
    return [t.numpy() for t in layer.factors("default")]


def test_default_init_is_kaiming_uniform_a_and_zero_b():
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=8, target_modules=["up_proj"]))
    A, B = factors(peft_model)
    fan_in = A.shape[1]
    assert np.abs(A).max() <= 1 / math.sqrt(fan_in) and A.std() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.2)
    assert not B.any()


def test_gaussian_init_has_std_one_over_r():
    model = tiny_model(hidden_size=256, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1)
    A, B = factors(get_peft_model(model, LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["up_proj"])))
    assert A.std() == pytest.approx(1 / 4, rel=0.1) and abs(A.mean()) < 0.03
    assert not B.any()


def test_init_false_makes_b_nonzero_and_changes_the_output():
    base = tiny_model()
    before = logits(base, token_ids())
    peft_model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False, target_modules=["up_proj"]))
    A, B = factors(peft_model)
    assert B.any() and np.abs(B).max() <= 1 / math.sqrt(4) and np.abs(A).max() <= 1 / math.sqrt(A.shape[1])
    assert not np.allclose(logits(peft_model, token_ids()), before)


def test_embedding_init_is_zero_a_and_standard_normal_b():
    model = tiny_model(hidden_size=64, intermediate_size=16, vocab_size=512, num_hidden_layers=1)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["embed_tokens"]))
    A, B = factors(peft_model, "model.embed_tokens")
    assert A.shape == (8, 512) and B.shape == (64, 8) and not A.any()
    assert B.std() == pytest.approx(1.0, rel=0.15)


def test_pissa_reconstructs_w_and_keeps_the_model_function():
    base = tiny_model(dtype=np.float64)
    original = {n: p.data.copy() for n, p in base.named_parameters()}
    before = logits(base, token_ids())
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                 target_modules=["q_proj", "down_proj"]))
    np.testing.assert_allclose(logits(peft_model, token_ids()), before, rtol=1e-10, atol=1e-10)
    for path, layer in peft_model.named_adapter_modules():
        W = original[path + ".weight"]
        residual = layer.base_layer.weight.data
        np.testing.assert_allclose(residual + layer.delta_weight("default"), W, atol=1e-12)
        U, S, Vh = np.linalg.svd(W)  # s·B A is W's best rank-4 part; the residual holds the rest
        np.testing.assert_allclose(layer.delta_weight("default"), (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-12)
        np.testing.assert_allclose(np.linalg.svd(residual, compute_uv=False)[:len(S) - 4], S[4:], atol=1e-12)


def test_pissa_adapter_loads_onto_the_residual_base_without_rerunning_the_svd(tmp_path):
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, init_lora_weights="pissa", target_modules=["v_proj"]))
    randomize(peft_model)
    expected = logits(peft_model.eval(), token_ids())
    peft_model.save_pretrained(tmp_path / "adapter")
    residual = peft_model.unload()
    residual.save_pretrained(tmp_path / "residual")
    loaded = PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(tmp_path / "residual"), tmp_path / "adapter")
    np.testing.assert_array_equal(logits(loaded, token_ids()), expected)


def test_pissa_refuses_tied_weights_and_too_large_ranks():
    with pytest.raises(ValueError, match="tied"):
        get_peft_model(tiny_model(tie_word_embeddings=True), LoraConfig(init_lora_weights="pissa",
                                                                       target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="r <= 16"):
        get_peft_model(tiny_model(), LoraConfig(r=20, init_lora_weights="pissa", target_modules=["v_proj"]))


# ----- dropout and the generator ---------------------------------------------------------------
def test_dropout_acts_on_the_adapter_input_only():
    block = adapted_block(6, 5, 0, r=3, lora_alpha=3, lora_dropout=0.5, init_lora_weights=False)
    layer, x = block.proj, np.random.default_rng(1).normal(size=(4, 6))
    A, B = (t.data for t in layer.factors("default"))
    W, b = layer.base_layer.weight.data, layer.base_layer.bias.data
    state = layer.rng.bit_generator.state
    with no_grad():
        y = block(Tensor(x)).numpy()
    mask = np.random.default_rng(0)
    mask.bit_generator.state = state
    kept = (mask.random(x.shape) >= 0.5) / 0.5
    np.testing.assert_allclose(y, x @ W.T + b + ((kept * x) @ A.T) @ B.T, rtol=1e-12)
    block.eval()
    with no_grad():
        np.testing.assert_allclose(block(Tensor(x)).numpy(), x @ (W + B @ A).T + b, rtol=1e-12)


def test_rng_state_restored_gives_bit_identical_dropout():
    peft_model = get_peft_model(tiny_model(), LoraConfig(lora_dropout=0.3, init_lora_weights=False), seed=7)
    state = peft_model.rng.bit_generator.state
    first = logits(peft_model, token_ids())
    assert not np.array_equal(logits(peft_model, token_ids()), first)  # a new mask each forward
    peft_model.rng.bit_generator.state = state
    np.testing.assert_array_equal(logits(peft_model, token_ids()), first)
    peft_model.rng = np.random.default_rng(0)  # a new generator reaches every layer
    assert all(m.rng is peft_model.rng for m in peft_model.adapter_modules())


def test_seed_fixes_the_initialisation():
    a = get_peft_model(tiny_model(), LoraConfig(init_lora_weights=False), seed=3)
    b = get_peft_model(tiny_model(), LoraConfig(init_lora_weights=False), seed=3)
    c = get_peft_model(tiny_model(), LoraConfig(init_lora_weights=False), seed=4)
    assert all(np.array_equal(p.data, q.data) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(np.array_equal(p.data, q.data) for p, q in zip(a.parameters(), c.parameters()))


# ----- named adapters --------------------------------------------------------------------------
def two_adapters(**extra):
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **extra))
    peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj", "down_proj", "embed_tokens"], **extra))
    randomize(peft_model)
    return peft_model.eval()


def only(name, **extra):
    """A model holding just adapter ``name`` of two_adapters(), with the same weights."""
    reference = two_adapters(**extra)
    reference.set_adapter(name)
    return reference


def test_added_adapter_is_inactive_and_frozen_until_set():
    peft_model = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"]))
    before = logits(peft_model, token_ids())
    count = peft_model.get_nb_trainable_parameters()
    peft_model.add_adapter("other", LoraConfig(init_lora_weights=False, target_modules=["q_proj"]))
    assert peft_model.active_adapter == "default" and peft_model.get_nb_trainable_parameters()[0] == count[0]
    np.testing.assert_array_equal(logits(peft_model, token_ids()), before)
    peft_model.set_adapter("other")
    assert [g.name for g in peft_model.parameter_groups()] == ["lora:other"]
    assert not np.allclose(logits(peft_model, token_ids()), before)
    peft_model.set_adapter("other", inference_mode=True)
    assert peft_model.parameter_groups() == []
    with pytest.raises(ValueError, match="already exists"):
        peft_model.add_adapter("other", LoraConfig())
    with pytest.raises(ValueError, match="not found"):
        peft_model.set_adapter("missing")


def test_set_adapter_switches_between_adapters():
    peft_model = two_adapters()
    base = logits(tiny_model(), token_ids())
    first = logits(peft_model, token_ids())
    peft_model.set_adapter("other")
    second = logits(peft_model, token_ids())
    assert not np.allclose(first, second) and not np.allclose(second, base)
    peft_model.set_adapter(["default", "other"])  # PEFT's base_model.set_adapter([...]): both, summed
    peft_model.merge_adapter()
    both = logits(peft_model, token_ids())
    peft_model.unmerge_adapter()
    np.testing.assert_allclose(logits(peft_model, token_ids()), both, rtol=1e-5, atol=1e-5)


def test_delete_adapter_removes_its_parameters_and_falls_back():
    peft_model = two_adapters()
    expected = logits(peft_model, token_ids())
    peft_model.set_adapter("other")
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        peft_model.delete_adapter("other")
    peft_model.unmerge_adapter()
    peft_model.delete_adapter("other")
    assert peft_model.active_adapter == "default" and list(peft_model.peft_config) == ["default"]
    assert not any(".other" in n for n, _ in peft_model.named_parameters())
    np.testing.assert_allclose(logits(peft_model, token_ids()), expected, rtol=1e-5, atol=1e-5)


def test_disable_adapter_gives_the_base_model_and_restores_state():
    peft_model = two_adapters(modules_to_save=["lm_head"])
    base, adapted = logits(tiny_model(), token_ids()), logits(peft_model, token_ids())
    peft_model.merge_adapter()
    with peft_model.disable_adapter():
        np.testing.assert_allclose(logits(peft_model, token_ids()), base, rtol=1e-5, atol=1e-5)
        assert peft_model.get_nb_trainable_parameters()[0] == 0
    assert all(m.merged_adapters == ["default"] for p, m in peft_model.named_adapter_modules()
               if isinstance(m, AdapterLayer) and "default" in m.adapter_names())
    np.testing.assert_allclose(logits(peft_model, token_ids()), adapted, rtol=1e-5, atol=1e-5)
    assert peft_model.get_nb_trainable_parameters()[0] > 0


# ----- mixed-adapter batches ----------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"modules_to_save": ["lm_head"]}], ids=["lora", "modules_to_save"])
def test_mixed_batch_rows_equal_single_adapter_runs(extra):
    ids = token_ids(batch=5)
    names = ["other", "default", "__base__", "other", "default"]
    mixed = logits(two_adapters(**extra), ids, adapter_names=names)
    single = {"default": logits(only("default", **extra), ids), "other": logits(only("other", **extra), ids)}
    with only("default", **extra).disable_adapter() as off:
        single["__base__"] = logits(off, ids)
    for row, name in enumerate(names):
        np.testing.assert_allclose(mixed[row], single[name][row], rtol=1e-5, atol=1e-5, err_msg=f"row {row}")


def test_mixed_batch_is_refused_where_peft_refuses_it():
    peft_model = two_adapters()
    ids = token_ids(batch=2)
    with pytest.raises(ValueError, match="2 rows"):
        peft_model(ids, adapter_names=["default"])
    with pytest.raises(ValueError, match="do not exist"):
        peft_model(ids, adapter_names=["default", "nope"])
    peft_model.train()
    with pytest.raises(ValueError, match="inference"):
        peft_model(ids, adapter_names=["default", "other"])
    peft_model.eval().merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        peft_model(ids, adapter_names=["default", "other"])


# ----- merging and unloading -----------------------------------------------------------------
def test_merge_and_unload_returns_a_plain_model_with_the_adapted_function():
    peft_model = two_adapters(modules_to_save=["lm_head"])
    expected = logits(peft_model, token_ids())
    merged = peft_model.merge_and_unload()
    assert type(merged) is mp.LlamaForCausalLM
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in tiny_model().named_parameters()]
    assert all(p.requires_grad for p in merged.parameters())
    np.testing.assert_allclose(logits(merged, token_ids()), expected, rtol=1e-5, atol=1e-5)


def test_unload_returns_the_original_base_model():
    peft_model = two_adapters(modules_to_save=["lm_head"])
    peft_model.merge_adapter()
    base = peft_model.unload()
    reference = tiny_model()
    for (n, p), (m, q) in zip(base.named_parameters(), reference.named_parameters()):
        assert n == m
        np.testing.assert_allclose(p.data, q.data, rtol=1e-6, atol=1e-6)


def test_merging_a_tied_weight_is_refused():
    with pytest.warns(UserWarning, match="tied"):
        peft_model = get_peft_model(tiny_model(tie_word_embeddings=True), LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="lm_head.weight"):
        peft_model.merge_adapter()


def test_safe_merge_refuses_non_finite_weights():
    peft_model = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"]))
    layer = peft_model.adapter_modules()[0]
    before = layer.base_layer.weight.data.copy()
    layer.lora_B["default"].weight.data[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        peft_model.merge_adapter(safe_merge=True)
    np.testing.assert_array_equal(layer.base_layer.weight.data, before)


# ----- the PeftModel surface ------------------------------------------------------------------
def test_the_issue_example_on_the_bundled_model(tmp_path):
    path = mp.bundled_model_path()
    model = get_peft_model(mp.LlamaForCausalLM.from_pretrained(path),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert printed(model.print_trainable_parameters) == \
        "trainable params: 8,960 || all params: 268,992 || trainable%: 3.3310\n"
    ids = np.array([[1, 20, 30, 40, 50]])
    out = model(ids, labels=ids)
    assert out.logits.shape == (1, 5, 512) and out.loss.size == 1
    randomize(model)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(path), tmp_path)
    merged = again.merge_and_unload()
    assert type(merged) is mp.LlamaForCausalLM
    np.testing.assert_allclose(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    assert again.peft_config == {} and model.config is model.base_model.model.config  # attributes forward


def test_hooks_delegate_to_the_registered_method(monkeypatch):
    peft_model = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"]))
    assert peft_model.regularizer() is None
    peft_model.mask_gradients(0)
    peft_model.on_step_end(0)
    calls = []
    method = dataclasses.replace(REGISTRY["LORA"], regularizer=lambda pm, name: Tensor(np.array(2.0)),
                                 on_step_end=lambda pm, name, step: calls.append((name, step)))
    monkeypatch.setattr(registry, "REGISTRY", {**REGISTRY, "LORA": method})
    assert peft_model.regularizer().item() == 2.0
    peft_model.on_step_end(5)
    assert calls == [("default", 5)]


def test_config_validation_names_the_field():
    for kwargs, field in [({"r": 0}, "'r'"), ({"lora_dropout": 1.0}, "lora_dropout"), ({"bias": "some"}, "bias"),
                          ({"init_lora_weights": "olora"}, "init_lora_weights"),
                          ({"rank_pattern": {"q": 1.5}}, "rank_pattern"), ({"task_type": "SEQ_CLS"}, "task_type")]:
        with pytest.raises(ConfigError, match=field):
            LoraConfig(**kwargs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoraConfig().r = 4


def test_config_defaults_are_peft_defaults():
    config = LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias, config.use_rslora, config.use_dora,
            config.init_lora_weights, config.rank_pattern, config.alpha_pattern) == \
        (8, 8, 0.0, "none", False, False, True, {}, {})
    assert get_peft_model(tiny_model(), config).peft_config["default"].target_modules == ("q_proj", "v_proj")


# ----- the fused forward ----------------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(r=4), dict(r=4, use_rslora=True), dict(r=3, lora_dropout=0.2),
                                    dict(r=2, use_dora=True)], ids=["plain", "rslora", "dropout", "dora"])
@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_layer_equals_base_plus_branch(config, bias, monkeypatch):
    """A plain LoRA Linear runs as one fused op; its loss and every gradient equal the composite
    base(x) + lora_branch(x). With dropout in training or DoRA the composite path runs."""
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    results, fused_calls = [], []
    for fused in (True, False):
        model = get_peft_model(tiny_model(dtype=np.float64, attention_bias=bias, mlp_bias=bias),
                               LoraConfig(target_modules=targets, **config))
        randomize(model)
        if not fused:
            monkeypatch.setattr(lora.LoraLinear, "_fusable", lambda self, name: False)
        calls = []
        original = mp.autograd.fused.low_rank.LowRankLinear.forward
        monkeypatch.setattr(mp.autograd.fused.low_rank.LowRankLinear, "forward",
                            lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
        model.rng = np.random.default_rng(7)  # the same dropout masks in both runs
        for _, module in model.named_adapter_modules():
            module.rng = model.rng
        ids = token_ids()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        fused_calls.append(len(calls))
        monkeypatch.undo()
    plain = "dropout" not in str(config) and "dora" not in str(config)
    assert fused_calls == ([len(targets) * 2, 0] if plain else [0, 0])  # 2 layers in the tiny model
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        np.testing.assert_allclose(grad, results[1][1][name], rtol=1e-9, atol=1e-12, err_msg=name)
