"""The shared weight difference ΔW (dense or sparse) of Child-tuning and FishMask: forward equals
x (W + ΔW)ᵀ, gradients are the dense gradient gathered at the mask, merge is exact, files are checked."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.autograd.tensor import Tensor
from minipeft.errors import CheckpointError
from minipeft.io import read_safetensors, write_safetensors
from minipeft.nn import Linear
from minipeft.peft import ChildTuningConfig, FishMaskConfig, PeftModel, get_peft_model
from minipeft.peft.core.names import PREFIX, WEIGHTS_NAME
from minipeft.peft.selective.weight_delta import (DeltaLinear, placeholder_mask, read_mask, save_mask,
                                                  sparse_layers, split_global)
from tests.helpers.gradcheck import numerical_gradient
from tests.peft.helpers import logits, randomize, tiny_model, token_ids


def linear_with_sparse(rng, out=5, inp=4, k=7):
    layer = DeltaLinear(Linear(inp, out, rng=rng, dtype=np.float64))
    mask = np.sort(rng.choice(out * inp, k, replace=False))
    layer.add_sparse("a", mask, "fisher")
    layer.active_adapters = ["a"]
    layer.delta_values["a"].data = rng.normal(size=k)
    return layer, mask


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(0, 20))
def test_sparse_forward_is_x_times_w_plus_delta(seed, k):
    rng = np.random.default_rng(seed)
    layer, mask = linear_with_sparse(rng, k=k)
    x = rng.normal(size=(2, 3, 4))
    dense = np.zeros(20)
    dense[mask] = layer.delta_values["a"].data
    expected = x @ (layer.base_layer.weight.data + dense.reshape(5, 4)).T
    np.testing.assert_allclose(layer(Tensor(x)).data, expected, rtol=1e-12, atol=1e-12)


def test_sparse_gradient_is_the_dense_gradient_at_the_mask_and_matches_finite_differences():
    rng = np.random.default_rng(0)
    layer, mask = linear_with_sparse(rng)
    x, weights = rng.normal(size=(3, 4)), rng.normal(size=(3, 5))
    layer.base_layer.weight.requires_grad = True  # for the dense gradient ∂L/∂W = ∂L/∂ΔW
    (layer(Tensor(x)) * Tensor(weights)).sum().backward()
    v = layer.delta_values["a"]
    np.testing.assert_allclose(v.grad, layer.base_layer.weight.grad.reshape(-1)[mask], rtol=1e-12)

    def f(arrays):
        v.data = arrays[0]
        return float((layer(Tensor(x)).data * weights).sum())

    original = v.data.copy()
    np.testing.assert_allclose(v.grad, numerical_gradient(f, [original], 0), rtol=1e-7, atol=1e-10)


def test_merge_adds_exactly_at_the_mask_and_unmerge_restores():
    rng = np.random.default_rng(1)
    layer, mask = linear_with_sparse(rng, k=9)
    w0 = layer.base_layer.weight.data.copy()
    layer.merge(["a"])
    changed = np.flatnonzero(layer.base_layer.weight.data.reshape(-1) != w0.reshape(-1))
    assert set(changed) <= set(mask)
    np.testing.assert_array_equal(layer.base_layer.weight.data.reshape(-1)[mask],
                                  w0.reshape(-1)[mask] + layer.delta_values["a"].data)
    layer.merge(["a"])  # idempotent
    layer.unmerge()
    np.testing.assert_allclose(layer.base_layer.weight.data, w0, rtol=0, atol=1e-15)


def test_split_and_placeholder_masks():
    sizes = [6, 4, 10]
    parts = split_global(np.array([0, 5, 6, 9, 10, 19]), sizes)
    assert [p.tolist() for p in parts] == [[0, 5], [0, 3], [0, 9]]
    masks = placeholder_mask(sizes, 7)
    assert sum(len(m) for m in masks) == 7 and all(len(m) for m in masks)  # evenly spread: every layer has some
    assert all(np.all(np.diff(m) > 0) and m.min() >= 0 and m.max() < s for m, s in zip(masks, sizes))


def test_forward_never_writes_the_base_weight():
    peft_model = get_peft_model(tiny_model(0), FishMaskConfig(keep_ratio=0.05, target_modules=["q_proj"]))
    randomize(peft_model)
    before = {n: p.data.copy() for n, p in peft_model.named_parameters() if "base_layer" in n}
    peft_model(token_ids(), labels=token_ids()).loss.backward()
    for n, p in peft_model.named_parameters():
        if n in before:
            np.testing.assert_array_equal(p.data, before[n])


# ----- files --------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    config = ChildTuningConfig(mode="D", reserve_p=0.2, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(tiny_model(0), config)
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    return tmp_path, config, peft_model


def test_sparse_file_layout(saved):
    folder, _, peft_model = saved
    tensors = read_safetensors(folder / WEIGHTS_NAME)
    for path, layer in sparse_layers(peft_model, "default"):
        indices, values = tensors[f"{PREFIX}{path}.delta_indices"], tensors[f"{PREFIX}{path}.delta_values"]
        assert indices.dtype == np.int64 and indices.shape == values.shape
        np.testing.assert_array_equal(indices, layer.delta_indices["default"])
    assert len(tensors) == 2 * len(sparse_layers(peft_model, "default"))


def corrupt(folder, key_end, change):
    path = folder / WEIGHTS_NAME
    tensors = dict(read_safetensors(path))
    key = next(k for k in tensors if k.endswith(key_end))
    tensors[key] = change(np.array(tensors[key]))
    write_safetensors(path, tensors)
    return key


@pytest.mark.parametrize("what, change", [
    ("delta_indices", lambda a: a + 10_000),  # out of range
    ("delta_indices", lambda a: a[::-1].copy()),  # not increasing
    ("delta_indices", lambda a: a.astype(np.float32)),  # not integers
    ("delta_values", lambda a: a[:-1].copy()),  # shorter than its indices
])
def test_a_bad_sparse_file_is_refused_naming_file_and_key(saved, what, change):
    folder, _, _ = saved
    key = corrupt(folder, f"q_proj.{what}", change)
    with pytest.raises(CheckpointError) as info:
        PeftModel.from_pretrained(tiny_model(0), folder)
    assert str(folder / WEIGHTS_NAME) in str(info.value) and key in str(info.value)


def test_missing_and_unexpected_keys_are_refused(saved):
    folder, _, _ = saved
    path = folder / WEIGHTS_NAME
    tensors = dict(read_safetensors(path))
    gone = next(k for k in tensors if k.endswith("v_proj.delta_values"))
    write_safetensors(path, {**{k: v for k, v in tensors.items() if k != gone}, "base_model.model.extra": np.zeros(1)})
    with pytest.raises(CheckpointError, match="missing key"):
        PeftModel.from_pretrained(tiny_model(0), folder)
    write_safetensors(path, {**tensors, "base_model.model.extra": np.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected keys"):
        PeftModel.from_pretrained(tiny_model(0), folder)


def test_a_saved_mask_is_reused_through_mask_path(saved, tmp_path):
    _, config, peft_model = saved
    save_mask(peft_model, tmp_path / "mask.safetensors")
    again = get_peft_model(tiny_model(0), config.replace(mask_path=str(tmp_path / "mask.safetensors")))
    for (_, a), (_, b) in zip(sparse_layers(peft_model, "default"), sparse_layers(again, "default")):
        np.testing.assert_array_equal(a.delta_indices["default"], b.delta_indices["default"])
        assert b.mask_source["default"] == "file" and not b.delta_values["default"].data.any()
    np.testing.assert_array_equal(logits(again, token_ids()), logits(tiny_model(0), token_ids()))  # ΔW = 0
    layers = sparse_layers(again, "default")
    with pytest.raises(CheckpointError, match="keeps 5"):
        read_mask(tmp_path / "mask.safetensors", layers, expected=5)
    with pytest.raises(CheckpointError, match="does not exist"):
        get_peft_model(tiny_model(0), config.replace(mask_path=str(tmp_path / "none.safetensors")))
