"""The fused head + loss (``linear_cross_entropy``) against its twin, a NumPy formula,
central differences, and the model's unfused path; and its memory: never the logits.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minipeft as mp
from minipeft.autograd import Tensor, no_grad
from minipeft.autograd.fused import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_ref
from minipeft.autograd.fused.linear_cross_entropy import LinearCrossEntropy
from minipeft.backend import to_numpy
from minipeft.errors import InputError
from tests.autograd.test_fused import (
    FAST,
    TIGHT,
    _peak_bytes,
    assert_fused_matches,
    cross_entropy_np,
    seeds,
    uniform,
    value_and_grads,
)


@st.composite
def head_case(draw):
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4))
    width, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, vocab, size=lead)
    labels[rng.random(lead) < 0.3] = IGNORE_INDEX
    labels.flat[0] = rng.integers(0, vocab)  # at least one row counts
    return uniform(seed, lead + (width,)), uniform(seed + 1, (vocab, width)), labels, seed


@FAST
@given(case=head_case())
def test_linear_cross_entropy(case, backend):
    """Loss == twin == NumPy; dh and dW == twin's == central differences."""
    h, weight, labels, seed = case
    y = backend(labels)
    assert_fused_matches(lambda a, w: linear_cross_entropy(a, w, y), lambda a, w: linear_cross_entropy_ref(a, w, y),
                         [h, weight], np.asarray(cross_entropy_np(h @ weight.T, labels)), backend, seed)


@pytest.mark.parametrize("chunk", [1, 5, 12, 13])
def test_chunks_agree_with_one_chunk(chunk, monkeypatch):
    """Chunks of one row, of 1 row out of 5 words, a ragged last chunk: the same loss and grads."""
    h, weight = uniform(0, (7, 3)), uniform(1, (5, 3))
    labels = np.array([0, 4, IGNORE_INDEX, 1, 2, 2, IGNORE_INDEX])
    expected, expected_grads = value_and_grads(lambda a, w: linear_cross_entropy(a, w, labels), [h, weight], np.asarray)
    monkeypatch.setattr(LinearCrossEntropy, "CHUNK_ELEMENTS", chunk)
    got, grads = value_and_grads(lambda a, w: linear_cross_entropy(a, w, labels), [h, weight], np.asarray)
    np.testing.assert_allclose(got, expected, **TIGHT)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, **TIGHT)


def test_a_frozen_head_gives_only_the_hidden_gradient(backend):
    """The PEFT case: W frozen, dh still flows (and no dW is formed)."""
    h, weight, labels = uniform(0, (2, 5, 4)), uniform(1, (9, 4)), np.arange(10).reshape(2, 5) % 9
    results = []
    for fn in (linear_cross_entropy, linear_cross_entropy_ref):
        ht, wt = Tensor(backend(h), requires_grad=True), Tensor(backend(weight))
        fn(ht, wt, backend(labels)).backward()
        assert wt.grad is None
        results.append(to_numpy(ht.grad))
    np.testing.assert_allclose(results[0], results[1], **TIGHT)


def test_the_upstream_gradient_scales_both_gradients():
    h, weight, labels = uniform(0, (4, 3)), uniform(1, (6, 3)), np.array([0, 5, 2, IGNORE_INDEX])
    grads = []
    for g in (1.0, -2.5):
        ht, wt = Tensor(h, requires_grad=True), Tensor(weight, requires_grad=True)
        (linear_cross_entropy(ht, wt, labels) * g).backward()
        grads.append((ht.grad, wt.grad))
    for one, scaled in zip(*grads):
        np.testing.assert_allclose(scaled, -2.5 * one, **TIGHT)


def test_rows_with_an_ignored_label_are_never_multiplied(backend):
    """Their hidden states are not read: a NaN there leaves the loss and every gradient finite
    and equal to the run without those rows (as PyTorch's cross-entropy skips them)."""
    h, weight = uniform(0, (5, 3)), uniform(1, (6, 3))
    labels = np.array([0, IGNORE_INDEX, 2, IGNORE_INDEX, 5])
    poisoned = h.copy()
    poisoned[labels == IGNORE_INDEX] = np.nan
    results = []
    kept = labels != IGNORE_INDEX
    for hidden, targets in ((poisoned, labels), (h[kept], labels[kept])):
        ht, wt = Tensor(backend(hidden), requires_grad=True), Tensor(backend(weight), requires_grad=True)
        loss = linear_cross_entropy(ht, wt, backend(targets))
        loss.backward()
        results.append((to_numpy(loss.data), to_numpy(ht.grad), to_numpy(wt.grad)))
    (loss, dh, dw), (loss_kept, dh_kept, dw_kept) = results
    np.testing.assert_allclose(loss, loss_kept, **TIGHT)
    np.testing.assert_allclose(dw, dw_kept, **TIGHT)
    np.testing.assert_allclose(dh[kept], dh_kept, **TIGHT)
    assert not dh[~kept].any()


def test_all_ignored_gives_nan_loss_and_zero_grads(backend):
    ht = Tensor(backend(uniform(0, (2, 3, 4))), requires_grad=True)
    wt = Tensor(backend(uniform(1, (5, 4))), requires_grad=True)
    loss = linear_cross_entropy(ht, wt, backend(np.full((2, 3), IGNORE_INDEX)))
    assert np.isnan(to_numpy(loss.data))
    loss.backward()
    assert not to_numpy(ht.grad).any() and not to_numpy(wt.grad).any()


def test_without_gradients_only_the_loss_is_computed():
    h, weight, labels = uniform(0, (6, 3)), uniform(1, (7, 3)), np.arange(6)
    with no_grad():
        loss = linear_cross_entropy(Tensor(h, requires_grad=True), Tensor(weight, requires_grad=True), labels)
    np.testing.assert_allclose(loss.data, cross_entropy_np(h @ weight.T, labels), **TIGHT)
    assert not loss.requires_grad


@pytest.mark.parametrize("bad", [7, -1])
def test_rejects_out_of_range_labels_and_a_row_mismatch(bad):
    h, weight = Tensor(uniform(0, (3, 2))), Tensor(uniform(1, (7, 2)))
    with pytest.raises(InputError, match=rf"cross_entropy labels.*id {bad}\b"):
        linear_cross_entropy(h, weight, np.array([0, bad, IGNORE_INDEX]))
    with pytest.raises(ValueError, match="rows"):
        linear_cross_entropy(h, weight, np.array([0, 1]))


def test_keeps_float32_and_flushes_what_would_be_subnormal():
    """Far-apart logits give probabilities below float32's smallest normal number; they
    are flushed to zero (BLAS slows down on subnormals) with no visible change."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal((16, 8)).astype(np.float32) * 12
    weight = rng.standard_normal((50, 8)).astype(np.float32) * 2
    labels = rng.integers(0, 50, 16)
    logits = h.astype(np.float64) @ weight.T.astype(np.float64)
    assert (np.exp(logits - logits.max(1, keepdims=True)) < np.finfo(np.float32).tiny).any()
    ht, wt = Tensor(h, requires_grad=True), Tensor(weight, requires_grad=True)
    loss = linear_cross_entropy(ht, wt, labels)
    loss.backward()
    assert loss.dtype == ht.grad.dtype == wt.grad.dtype == np.float32
    h64, w64 = Tensor(h.astype(np.float64), requires_grad=True), Tensor(weight.astype(np.float64), requires_grad=True)
    linear_cross_entropy_ref(h64, w64, labels).backward()  # float64: nothing subnormal
    np.testing.assert_allclose(ht.grad, h64.grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(wt.grad, w64.grad, rtol=1e-4, atol=1e-6)


def test_memory_stays_below_the_logits():
    """Forward + backward with a frozen head never hold the (N, V) logits: the peak is the
    chunk buffer, a fraction of them; the unfused chain needs twice the logits or more."""
    rows, width, vocab = 2048, 32, 4096
    rng = np.random.default_rng(0)
    h = rng.standard_normal((rows, width), dtype=np.float32)
    weight = rng.standard_normal((vocab, width), dtype=np.float32) * 0.1
    labels = rng.integers(0, vocab, size=rows)
    logits_bytes = rows * vocab * 4
    grads = {}

    def step(fn, key):
        ht = Tensor(h, requires_grad=True)
        fn(ht, Tensor(weight), labels).backward()
        grads[key] = ht.grad

    LinearCrossEntropy.CHUNK_ELEMENTS, default = logits_bytes // 4 // 8, LinearCrossEntropy.CHUNK_ELEMENTS
    try:
        fused_peak = _peak_bytes(lambda: step(linear_cross_entropy, "fused"))
    finally:
        LinearCrossEntropy.CHUNK_ELEMENTS = default
    assert fused_peak < 0.3 * logits_bytes, f"fused head + loss peaked at {fused_peak / logits_bytes:.2f}x the logits"
    ref_peak = _peak_bytes(lambda: step(lambda a, w, y: mp.autograd.fused.cross_entropy(
        mp.autograd.fused.linear(a, w), y), "unfused"))
    assert ref_peak > 2 * logits_bytes  # the measurement can tell the difference
    np.testing.assert_allclose(grads["fused"], grads["unfused"], rtol=1e-4, atol=1e-8)


# ----- in the model ------------------------------------------------------------------
def _model(tied: bool):
    config = mp.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                            tie_word_embeddings=tied)
    return mp.LlamaForCausalLM(config, rng=np.random.default_rng(0)).to(dtype=np.float64)


@pytest.mark.parametrize("tied", [False, True])
def test_a_training_forward_equals_the_unfused_loss_and_gradients(tied):
    """With labels and gradients the model takes the fused path; the loss and every
    gradient equal the unfused head + cross-entropy, and the logits appear when read."""
    model = _model(tied)
    ids = np.random.default_rng(1).integers(0, 40, (2, 9))
    labels = ids.copy()
    labels[0, :3] = IGNORE_INDEX

    out = model(ids, labels=labels)
    assert out._logits is None  # not formed by the step itself
    out.loss.backward()
    fused = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(ids).logits  # the unfused path, by hand
    unfused = mp.autograd.fused.cross_entropy(logits, mp.models.llama.shift_labels(labels))
    unfused.backward()
    np.testing.assert_allclose(out.loss.data, unfused.data, rtol=1e-12)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(fused[name], p.grad, rtol=1e-10, atol=1e-13, err_msg=name)
    with no_grad():
        np.testing.assert_allclose(out.logits.data, model(ids).logits.data, rtol=1e-12)  # read on demand
        evaluation = model(ids, labels=labels)  # without gradients: the logits come with the loss
    assert evaluation._logits is not None
    np.testing.assert_allclose(evaluation.loss.data, out.loss.data, rtol=1e-12)
