"""DoRA (dora.py): the decomposition, its init, the detached norm, and exact merges."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.autograd import Tensor, no_grad
from minipeft.io import read_safetensors
from minipeft.peft import LoraConfig, get_peft_model
from minipeft.peft.lowrank import dora
from tests.helpers.gradcheck import weighted_sum
from tests.peft.helpers import assert_grads_match_fd, frozen_dora_norms, logits, randomize, tiny_model, token_ids
from tests.peft.lowrank.test_lora import adapted_block


def row_norms(W):
    return np.sqrt((W * W).sum(axis=1))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), r=st.integers(1, 6), alpha=st.floats(0.5, 32), rslora=st.booleans(),
       scale=st.floats(0.0, 2.0))
def test_dora_equals_lora_at_init_for_any_a_and_b(seed, r, alpha, rslora, scale):
    """m starts at ‖W + sBA‖, so g = 1: DoRA computes exactly what LoRA computes, whatever A, B are."""
    common = dict(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False,
                  target_modules=["q_proj", "down_proj", "embed_tokens"])
    lora_model = get_peft_model(tiny_model(seed), LoraConfig(**common), seed=seed)
    randomize(lora_model, seed, scale)
    dora_model = get_peft_model(tiny_model(seed), LoraConfig(use_dora=True, **common), seed=seed)
    for (path, a), (_, b) in zip(lora_model.named_adapter_modules(), dora_model.named_adapter_modules()):
        for p, q in zip(a.factors("default"), b.factors("default")):
            q.data = p.data.copy()
        dora.init_magnitude(b, "default")  # m again from the new A, B
    np.testing.assert_array_equal(logits(dora_model, token_ids(seed)), logits(lora_model, token_ids(seed)))


def test_magnitude_starts_at_the_row_norms_of_the_adapted_weight():
    peft_model = get_peft_model(tiny_model(dtype=np.float64), LoraConfig(
        r=4, use_dora=True, init_lora_weights=False, target_modules=["v_proj", "embed_tokens"]))
    for path, layer in peft_model.named_adapter_modules():
        W = layer.base_layer.weight.data + layer.delta_weight("default")
        m = layer.lora_magnitude_vector["default"].weight.data
        expected = row_norms(W) if path.endswith("v_proj") else row_norms(W.T)  # embeddings: over the vocabulary
        np.testing.assert_allclose(m, expected, rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(inp=st.integers(1, 8), out=st.integers(1, 8), r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_forward_is_the_decomposed_weight(inp, out, r, seed):
    """y = x W'ᵀ + b, W' = m ⊙ (W + sBA) / ‖W + sBA‖_row, for any m, A, B."""
    block = adapted_block(inp, out, seed, r=r, lora_alpha=2 * r, use_dora=True, init_lora_weights=False)
    layer, rng = block.proj, np.random.default_rng(seed)
    m = layer.lora_magnitude_vector["default"].weight
    m.data = m.data * rng.uniform(0.5, 1.5, m.shape)
    W, b = layer.base_layer.weight.data, layer.base_layer.bias.data
    V = W + layer.delta_weight("default")
    x = rng.normal(size=(2, 3, inp))
    with no_grad():
        y = block(Tensor(x)).numpy()
    np.testing.assert_allclose(y, x @ (m.data[:, None] * V / row_norms(V)[:, None]).T + b, rtol=1e-10, atol=1e-12)


def test_the_norm_is_detached_from_the_gradient():
    """Backward treats n as a constant (§4.3): it equals differences with n held fixed and
    differs from the derivative of the full function, in which n moves with A and B."""
    block = adapted_block(5, 4, 1, r=2, lora_alpha=2, use_dora=True, init_lora_weights=False)
    layer, x = block.proj, Tensor(np.random.default_rng(2).normal(size=(3, 5)))
    A, B = layer.factors("default")
    with frozen_dora_norms():
        assert_grads_match_fd(lambda: weighted_sum(block(x)), [A, B, layer.lora_magnitude_vector["default"].weight])
    with pytest.raises(AssertionError):
        assert_grads_match_fd(lambda: weighted_sum(block(x)), [A, B])


def test_dropout_feeds_both_terms_the_same_dropped_input():
    block = adapted_block(6, 5, 0, r=2, lora_alpha=2, lora_dropout=0.5, use_dora=True, init_lora_weights=False)
    layer, x = block.proj, np.random.default_rng(4).normal(size=(4, 6))
    m = layer.lora_magnitude_vector["default"].weight
    m.data = m.data * 1.3
    A, B = (t.data for t in layer.factors("default"))
    W, b = layer.base_layer.weight.data, layer.base_layer.bias.data
    g = m.data / row_norms(W + B @ A)
    state = layer.rng.bit_generator.state
    with no_grad():
        y = block(Tensor(x)).numpy()
    replay = np.random.default_rng(0)
    replay.bit_generator.state = state
    xd = x * (replay.random(x.shape) >= 0.5) / 0.5
    np.testing.assert_allclose(y, x @ W.T + b + (g - 1) * (xd @ W.T) + g * (xd @ A.T @ B.T), rtol=1e-12)


def test_merge_and_unmerge_are_exact_in_float64():
    peft_model = get_peft_model(tiny_model(dtype=np.float64), LoraConfig(
        r=4, use_dora=True, target_modules=["q_proj", "embed_tokens", "down_proj"])).eval()
    randomize(peft_model)
    before = {n: p.data.copy() for n, p in peft_model.named_parameters()}
    unmerged = logits(peft_model, token_ids())
    peft_model.merge_adapter()
    for path, layer in peft_model.named_adapter_modules():
        axis = 1 if path.endswith("proj") else 0
        V = before[f"base_model.model.{path}.base_layer.weight"] + layer.delta_weight("default")
        m = layer.lora_magnitude_vector["default"].weight.data
        n = np.sqrt((V * V).sum(axis=axis, keepdims=True))
        np.testing.assert_allclose(layer.base_layer.weight.data, np.expand_dims(m, axis) * V / n, rtol=1e-13)
    np.testing.assert_allclose(logits(peft_model, token_ids()), unmerged, rtol=1e-11, atol=1e-11)
    peft_model.unmerge_adapter()
    for name, p in peft_model.named_parameters():
        np.testing.assert_allclose(p.data, before[name], rtol=1e-13, atol=1e-14, err_msg=name)


def test_two_dora_adapters_merged_in_turn_equal_the_unmerged_composition():
    """As PEFT: each DoRA adapter rescales what came before it, exactly what merging in turn gives."""
    peft_model = get_peft_model(tiny_model(dtype=np.float64), LoraConfig(r=2, use_dora=True, target_modules=["v_proj"]))
    peft_model.add_adapter("second", LoraConfig(r=3, use_dora=True, target_modules=["v_proj", "o_proj"]))
    randomize(peft_model)
    peft_model.set_adapter(["default", "second"])
    unmerged = logits(peft_model.eval(), token_ids())
    peft_model.merge_adapter()
    np.testing.assert_allclose(logits(peft_model, token_ids()), unmerged, rtol=1e-11, atol=1e-11)
    peft_model.unmerge_adapter()
    np.testing.assert_allclose(logits(peft_model, token_ids()), unmerged, rtol=1e-11, atol=1e-11)


def test_mixed_batches_refuse_dora_adapters():
    peft_model = get_peft_model(tiny_model(), LoraConfig(use_dora=True)).eval()
    with pytest.raises(ValueError, match="DoRA"):
        peft_model(token_ids(batch=2), adapter_names=["default", "__base__"])


def test_magnitude_is_saved_without_the_weight_suffix(tmp_path):
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight" in \
        dict(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path)
    keys = set(read_safetensors(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"weight", "lora_magnitude_vector"}
