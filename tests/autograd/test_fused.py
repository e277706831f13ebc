"""Fused ops against their composite ``*_ref`` twins, plain NumPy and central differences.

For every fused op: (a) the fused forward equals its twin (float64, tight tolerance)
and a NumPy formula written here; (b) the fused gradient equals the twin's; (c) the
fused gradient equals float64 central differences. Shapes are drawn by hypothesis.
"""
from __future__ import annotations

import gc
import math
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minipeft.autograd import Tensor, no_grad
from minipeft.autograd.fused import (
    IGNORE_INDEX,
    attention,
    attention_bias,
    attention_ref,
    cross_entropy,
    cross_entropy_ref,
    embedding,
    embedding_ref,
    linear,
    linear_ref,
    log_softmax,
    log_softmax_ref,
    rms_norm,
    rms_norm_ref,
    rope,
    rope_ref,
    silu_mul,
    silu_mul_ref,
    softmax,
    softmax_ref,
)
from minipeft.autograd.fused import thin_products
from minipeft.autograd.fused.low_rank import low_rank_linear
from minipeft.autograd.fused.attention import Attention, Rope
from minipeft.autograd.fused.softmax import CrossEntropy
from minipeft.backend import to_numpy
from minipeft.errors import InputError
from tests.helpers.gradcheck import check_gradients, weighted_sum

FAST = settings(max_examples=20, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=12, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
seeds = st.integers(0, 2**32 - 1)
TIGHT = {"rtol": 1e-11, "atol": 1e-13}  # fused vs twin / formula, both float64


def uniform(seed, shape, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape)


def value_and_grads(fn, arrays, to_backend, seed=0):
    """Run ``fn`` on float64 leaves, backward through a weighted sum; NumPy results."""
    leaves = [Tensor(to_backend(np.asarray(a, dtype=np.float64)), requires_grad=True)
              for a in arrays]
    out = fn(*leaves)
    weighted_sum(out, seed).backward()
    return to_numpy(out.data), [to_numpy(leaf.grad) for leaf in leaves]


def assert_fused_matches(fused, ref, arrays, expected, backend, seed):
    """(a) fused == twin == formula, (b) fused grads == twin grads, (c) == central diffs."""
    out_f, grads_f = value_and_grads(fused, arrays, backend, seed)
    out_r, grads_r = value_and_grads(ref, arrays, backend, seed)
    assert out_f.shape == expected.shape
    np.testing.assert_allclose(out_f, out_r, **TIGHT, err_msg="fused forward != twin")
    np.testing.assert_allclose(out_f, expected, **TIGHT, err_msg="fused forward != NumPy")
    for i, (gf, gr) in enumerate(zip(grads_f, grads_r)):
        np.testing.assert_allclose(gf, gr, rtol=1e-10, atol=1e-12,
                                   err_msg=f"fused gradient of input {i} != twin's")
    check_gradients(lambda *ts: weighted_sum(fused(*ts), seed), arrays)


def softmax_np(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_np(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


# ----- softmax and log-softmax -----------------------------------------------------
SOFTMAXES = {
    "softmax": (softmax, softmax_ref, softmax_np),
    "log_softmax": (log_softmax, log_softmax_ref, log_softmax_np),
}


@pytest.mark.parametrize("name", sorted(SOFTMAXES))
@FAST
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), seed=seeds)
def test_softmax_family(name, data, shape, seed, backend):
    fused, ref, formula = SOFTMAXES[name]
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = uniform(seed, shape, -4, 4)
    assert_fused_matches(lambda t: fused(t, axis=axis), lambda t: ref(t, axis=axis), [x],
                         formula(x, axis), backend, seed)


@pytest.mark.parametrize("name", sorted(SOFTMAXES))
def test_softmax_family_is_stable_for_large_logits(name, backend):
    fused, _, formula = SOFTMAXES[name]
    x = uniform(0, (3, 5)) + 1000.0
    out = to_numpy(fused(Tensor(backend(x))).data)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, formula(x - 1000.0), **TIGHT)


# ----- cross-entropy ---------------------------------------------------------------
def cross_entropy_np(logits, labels, ignore_index=IGNORE_INDEX):
    x = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    kept = y != ignore_index
    logp = log_softmax_np(x[kept])
    return -logp[np.arange(kept.sum()), y[kept]].mean()


@st.composite
def ce_case(draw):
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4))
    vocab = draw(st.integers(1, 6))
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, vocab, size=lead)
    labels[rng.random(lead) < 0.3] = IGNORE_INDEX
    labels.flat[0] = rng.integers(0, vocab)  # at least one row counts
    return uniform(seed, lead + (vocab,), -3, 3), labels, seed


@FAST
@given(case=ce_case())
def test_cross_entropy(case, backend):
    logits, labels, seed = case
    y = backend(labels)
    assert_fused_matches(lambda t: cross_entropy(t, y), lambda t: cross_entropy_ref(t, y),
                         [logits], np.asarray(cross_entropy_np(logits, labels)), backend, seed)


def test_cross_entropy_gradient_formula():
    """dx = (softmax(x) − onehot(y)) / n on kept rows, 0 on ignored rows."""
    logits, labels = uniform(0, (5, 4)), np.array([1, IGNORE_INDEX, 3, 0, IGNORE_INDEX])
    leaf = Tensor(logits, requires_grad=True)
    cross_entropy(leaf, labels).backward()
    kept = labels != IGNORE_INDEX
    expected = softmax_np(logits)
    expected[np.arange(5), np.where(kept, labels, 0)] -= 1
    expected *= kept[:, None] / kept.sum()
    np.testing.assert_allclose(leaf.grad, expected, **TIGHT)


def test_cross_entropy_accepts_tensor_labels_and_a_custom_ignore_index():
    logits, labels = uniform(0, (4, 3)), np.array([2, -1, 0, -1])
    loss = cross_entropy(Tensor(logits), Tensor(labels), ignore_index=-1)
    np.testing.assert_allclose(loss.data, cross_entropy_np(logits, labels, -1), **TIGHT)
    with pytest.raises(InputError, match="-100"):  # -100 is now an ordinary (bad) label
        cross_entropy(Tensor(logits), np.array([2, -100, 0, 1]), ignore_index=-1)


def test_cross_entropy_all_ignored_gives_nan_loss_and_zero_grad(backend):
    leaf = Tensor(backend(uniform(0, (2, 3, 5))), requires_grad=True)
    labels = backend(np.full((2, 3), IGNORE_INDEX))
    loss = cross_entropy(leaf, labels)
    assert np.isnan(to_numpy(loss.data))
    loss.backward()
    np.testing.assert_array_equal(to_numpy(leaf.grad), np.zeros((2, 3, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the twin divides 0 by 0
        assert np.isnan(to_numpy(cross_entropy_ref(Tensor(leaf.data), labels).data))


@pytest.mark.parametrize("bad", [5, 7, -1, -99])
def test_cross_entropy_rejects_out_of_range_labels(bad, backend):
    labels = backend(np.array([0, bad, IGNORE_INDEX]))
    with pytest.raises(InputError, match=rf"cross_entropy labels.*id {bad}\b"):
        cross_entropy(Tensor(backend(uniform(0, (3, 5)))), labels)


def test_cross_entropy_rejects_a_row_count_mismatch():
    with pytest.raises(ValueError, match="rows"):
        cross_entropy(Tensor(uniform(0, (3, 5))), np.array([0, 1]))


@pytest.mark.parametrize("chunk", [1, 4, 10, 12])
def test_cross_entropy_chunks_agree_with_one_chunk(chunk, monkeypatch):
    """Tiny chunks (1 row each, 2.5 rows, a ragged last chunk) give the same loss and grad."""
    logits, labels = uniform(3, (7, 4)), np.array([0, 3, IGNORE_INDEX, 1, 2, 2, IGNORE_INDEX])
    expected, (expected_grad,) = value_and_grads(lambda t: cross_entropy(t, labels),
                                                 [logits], np.asarray)
    monkeypatch.setattr(CrossEntropy, "CHUNK_ELEMENTS", chunk)
    got, (grad,) = value_and_grads(lambda t: cross_entropy(t, labels), [logits], np.asarray)
    np.testing.assert_allclose(got, expected, **TIGHT)
    np.testing.assert_allclose(grad, expected_grad, **TIGHT)


def test_cross_entropy_keeps_float32():
    leaf = Tensor(uniform(0, (4, 6)).astype(np.float32), requires_grad=True)
    loss = cross_entropy(leaf, np.array([0, 1, 2, 3]))
    assert loss.dtype == np.float32
    loss.backward()
    assert leaf.grad.dtype == np.float32


def _peak_bytes(fn):
    """Peak traced bytes allocated while ``fn`` runs (garbage collected before, paused during,
    so leftovers of earlier tests neither count nor get freed mid-measurement)."""
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()


def test_cross_entropy_memory_is_one_logits_buffer_plus_chunks():
    """Forward + backward peak below 2.5× the logits: the gradient buffer plus chunked
    temporaries, never the several logits-sized arrays the composite twin keeps."""
    rows, vocab = 2048, 4096
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, vocab), dtype=np.float32)
    labels = rng.integers(0, vocab, size=rows)
    labels[::7] = IGNORE_INDEX
    grads = {}

    def fused_step():
        leaf = Tensor(logits, requires_grad=True)
        cross_entropy(leaf, labels).backward()
        grads["fused"] = leaf.grad

    def ref_step():
        leaf = Tensor(logits, requires_grad=True)
        cross_entropy_ref(leaf, labels).backward()
        grads["ref"] = leaf.grad

    fused_peak = _peak_bytes(fused_step)
    assert fused_peak < 2.5 * logits.nbytes, (
        f"fused cross_entropy peaked at {fused_peak / logits.nbytes:.2f}x the logits")
    # Backward alone: exactly one logits-sized buffer, handed to the leaf uncopied.
    leaf = Tensor(logits, requires_grad=True)
    loss = cross_entropy(leaf, labels)
    backward_peak = _peak_bytes(loss.backward)
    assert backward_peak < 1.25 * logits.nbytes, (
        f"cross_entropy backward peaked at {backward_peak / logits.nbytes:.2f}x the logits")
    del leaf, loss
    # The measurement can tell the difference: the composite twin needs far more.
    ref_peak = _peak_bytes(ref_step)
    assert ref_peak > 2.5 * logits.nbytes
    np.testing.assert_allclose(grads["fused"], grads["ref"], rtol=1e-4, atol=1e-9)


# ----- linear ------------------------------------------------------------------------
@st.composite
def linear_case(draw):
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    n_in, n_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return lead + (n_in,), (n_out, n_in), draw(st.booleans()), draw(seeds)


@FAST
@given(case=linear_case())
def test_linear(case, backend):
    x_shape, w_shape, with_bias, seed = case
    x, w, b = uniform(seed, x_shape), uniform(seed + 1, w_shape), uniform(seed + 2, w_shape[:1])
    if with_bias:
        assert_fused_matches(linear, linear_ref, [x, w, b], x @ w.T + b, backend, seed)
    else:
        assert_fused_matches(linear, linear_ref, [x, w], x @ w.T, backend, seed)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_with_a_frozen_weight(with_bias, backend):
    """The PEFT case: W frozen, gradients still flow to x (and to a trainable bias)."""
    x, w, b = uniform(0, (2, 3, 4)), uniform(1, (5, 4)), uniform(2, (5,))
    results = []
    for fn in (linear, linear_ref):
        xt = Tensor(backend(x), requires_grad=True)
        wt = Tensor(backend(w))
        bt = Tensor(backend(b), requires_grad=True) if with_bias else None
        weighted_sum(fn(xt, wt, bt)).backward()
        assert wt.grad is None
        results.append((to_numpy(xt.grad), None if bt is None else to_numpy(bt.grad)))
    np.testing.assert_allclose(results[0][0], results[1][0], **TIGHT)
    if with_bias:
        np.testing.assert_allclose(results[0][1], results[1][1], **TIGHT)


def test_linear_with_a_constant_input_gives_only_weight_grads():
    x, w = uniform(0, (3, 4)), uniform(1, (2, 4))
    wt = Tensor(w, requires_grad=True)
    weighted_sum(linear(Tensor(x), wt)).backward()
    wr = Tensor(w, requires_grad=True)
    weighted_sum(linear_ref(Tensor(x), wr)).backward()
    np.testing.assert_allclose(wt.grad, wr.grad, **TIGHT)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 22, 32, 33, 70])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_few_row_paths_equal_the_plain_product(rows, dtype):
    """Few rows take NumPy's dot loop (≤ VECDOT_ROWS), W in small-kernel blocks (float32 on
    an AVX-512 OpenBLAS) or W as the left operand (≤ WEIGHT_LEFT_ROWS): the same numbers as
    x Wᵀ, C-contiguous, of the same dtype."""
    x = uniform(0, (rows, 24)).astype(dtype)
    w, b = uniform(1, (40, 24)).astype(dtype), uniform(2, (40,)).astype(dtype)
    y = linear(Tensor(x.reshape(1, rows, 24)), Tensor(w), Tensor(b)).data
    assert y.shape == (1, rows, 40) and y.dtype == dtype and y.flags.c_contiguous
    close = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else TIGHT
    np.testing.assert_allclose(y[0], x @ w.T + b, **close)


@pytest.mark.parametrize("rows", [5, 8, 22, 33, 64, 75])
def test_linear_in_small_kernel_blocks_equals_the_plain_product(rows, monkeypatch):
    """W in blocks of rows sized for OpenBLAS's small-matrix kernels (forced on, whatever this
    machine's BLAS): the same numbers as x Wᵀ, also when the blocks do not divide W's rows."""
    monkeypatch.setattr(thin_products, "has_small_sgemm_kernels", lambda: True)
    x = uniform(0, (rows, 288)).astype(np.float32)
    w = uniform(1, (300, 288)).astype(np.float32)
    block = thin_products.small_kernel_block(rows, 288, b_transposed=True)
    assert 0 < block < 300 and 300 % block  # several blocks, the last one short
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    y = linear(Tensor(x), Tensor(w)).data
    assert y.dtype == np.float32 and y.flags.c_contiguous
    assert np.all(np.abs(y - exact) <= 1e-5 * (np.abs(x) @ np.abs(w.T)))  # float32 rounding


@pytest.mark.parametrize(("rows", "width"), [(5, 288), (22, 576), (22, 1536), (32, 576), (64, 576), (75, 96)])
def test_small_kernel_blocks_keep_to_openblas_permit(rows, width):
    """A block is a multiple of 16 with M·N·K ≤ 10⁶, and with a transposed right operand
    also M·N ≤ 1200 and K ≥ 32; one too small to pay for its call is refused."""
    block = thin_products.small_kernel_block(rows, width, b_transposed=True)
    assert block >= 16 and block % 16 == 0
    assert block * rows <= 1200 and block * rows * width <= 10**6
    assert thin_products.small_kernel_block(rows, 31, b_transposed=True) == 0  # K below 32
    assert thin_products.small_kernel_block(76, width, b_transposed=True) == 0  # 16 no longer fit
    plain = thin_products.small_kernel_block(rows, width, b_transposed=False)
    assert plain >= block and plain * rows * width <= 10**6 < (plain + 16) * rows * width
    assert thin_products.small_kernel_block(512, 1536, b_transposed=False) == 0  # training-size
    assert thin_products.small_kernel_block(8, 64, b_transposed=True) == 0  # 144 × 8 × 64 < 10⁵


# LoRA's rank-8 products of a 576 → 1536 layer at 512 rows (SmolLM2's MLP), as LowRankLinear
# forms them (``.T`` of a C-contiguous array is what BLAS sees as transposed)
THIN_PRODUCTS = {
    "x Aᵀ": lambda x, g, A, B, u, v: (x, A.T),
    "g B": lambda x, g, A, B, u, v: (g, B),
    "v A": lambda x, g, A, B, u, v: (v, A),
    "vᵀ x": lambda x, g, A, B, u, v: (v.T, x),
    "gᵀ u": lambda x, g, A, B, u, v: (g.T, u),
    "(u)(Bᵀ): inner 8, not blocked": lambda x, g, A, B, u, v: (u, B.T),
    "both transposed, not blocked": lambda x, g, A, B, u, v: (g.T, np.ascontiguousarray(u.T).T),
}


@pytest.mark.parametrize("name", list(THIN_PRODUCTS))
def test_thin_matmul_in_blocks_equals_one_product(name, monkeypatch):
    """LoRA's thin products in small-kernel blocks (forced on): the same numbers as a @ b;
    the first five do run in several blocks."""
    monkeypatch.setattr(thin_products, "has_small_sgemm_kernels", lambda: True)
    x, g = uniform(0, (512, 576)).astype(np.float32), uniform(1, (512, 1536)).astype(np.float32)
    A, B = uniform(2, (8, 576)).astype(np.float32), uniform(3, (1536, 8)).astype(np.float32)
    u, v = x @ A.T, g @ B
    a, b = THIN_PRODUCTS[name](x, g, A, B, u, v)
    (m, inner), n = a.shape, b.shape[1]
    transposed = thin_products.is_transposed(a), thin_products.is_transposed(b)
    block = 0 if all(transposed) else thin_products.small_kernel_block(min(m, n), inner, transposed[1])
    assert (0 < block < max(m, n)) == ("not blocked" not in name)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = thin_products.thin_matmul(a, b)
    assert got.shape == exact.shape and got.dtype == np.float32
    # float32 rounding of sums over up to 1,536 terms, relative to the sums of |terms|
    assert np.all(np.abs(got - exact) <= 1e-5 * (np.abs(a) @ np.abs(b)))


def test_lora_layer_in_small_kernel_blocks_matches_float64(monkeypatch):
    """The fused LoRA layer in float32 with its thin products blocked (forced on): output and
    every gradient match the same layer in float64."""
    monkeypatch.setattr(thin_products, "has_small_sgemm_kernels", lambda: True)
    arrays = [uniform(0, (2, 256, 576)), uniform(1, (1536, 576)), uniform(2, (8, 576)), uniform(3, (1536, 8))]
    seed = uniform(4, (2, 256, 1536))
    results = []
    for dtype in (np.float32, np.float64):
        leaves = [Tensor(a.astype(dtype), requires_grad=True) for a in arrays]
        out = low_rank_linear(*leaves, scale=0.5)
        (out * Tensor(seed.astype(dtype))).sum().backward()
        results.append([out.data] + [leaf.grad for leaf in leaves])
    for name, got, want in zip(["out", "dx", "dW", "dA", "dB"], *results):
        # float32 sums over 512 rows: errors relative to the array's scale, not each element's
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)


# ----- embedding ---------------------------------------------------------------------
@st.composite
def embedding_case(draw):
    vocab, dim = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    ids_shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4))
    seed = draw(seeds)
    ids = np.random.default_rng(seed).integers(0, vocab, size=ids_shape)
    ids.flat[-1] = ids.flat[0]  # a repeated id whenever there are two positions
    return uniform(seed, (vocab, dim)), ids, seed


@FAST
@given(case=embedding_case())
def test_embedding(case, backend):
    weight, ids, seed = case
    d_ids = backend(ids)
    out_f, (grad_f,) = value_and_grads(lambda w: embedding(w, d_ids), [weight], backend, seed)
    out_r, (grad_r,) = value_and_grads(lambda w: embedding_ref(w, d_ids), [weight], backend, seed)
    np.testing.assert_array_equal(out_f, weight[ids])
    np.testing.assert_array_equal(out_f, out_r)
    # Scatter-add: each row's gradient is the sum over every position holding that id.
    g = np.random.default_rng(seed).uniform(-1, 1, size=ids.shape + weight.shape[1:])
    expected = np.zeros_like(weight)
    np.add.at(expected, ids, g)
    np.testing.assert_allclose(grad_f, expected, **TIGHT)
    np.testing.assert_allclose(grad_f, grad_r, **TIGHT)
    check_gradients(lambda w: weighted_sum(embedding(w, ids), seed), [weight])


def test_embedding_repeated_ids_accumulate():
    weight = Tensor(np.zeros((4, 2)), requires_grad=True)
    embedding(weight, np.array([[1, 1, 3], [1, 0, 3]])).sum().backward()
    np.testing.assert_array_equal(weight.grad[:, 0], [1, 3, 0, 2])


@pytest.mark.parametrize("bad", [4, 9, -1])
def test_embedding_rejects_out_of_range_ids(bad, backend):
    """NumPy would raise IndexError for 4 and wrap -1; CuPy wraps both. Neither may pass."""
    weight = Tensor(backend(np.zeros((4, 2))))
    with pytest.raises(InputError, match=rf"embedding input_ids.*id {bad}\b"):
        embedding(weight, backend(np.array([[0, bad], [1, 2]])))


def test_embedding_accepts_tensor_ids():
    weight = uniform(0, (4, 2))
    np.testing.assert_array_equal(embedding(Tensor(weight), Tensor(np.array([3, 0]))).data,
                                  weight[[3, 0]])


# ----- rms_norm and silu_mul -----------------------------------------------------------
@FAST
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), seed=seeds,
       eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rms_norm(shape, seed, eps, backend):
    x, w = uniform(seed, shape), uniform(seed + 1, shape[-1:])
    expected = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * w
    assert_fused_matches(lambda a, b: rms_norm(a, b, eps=eps),
                         lambda a, b: rms_norm_ref(a, b, eps=eps), [x, w], expected, backend, seed)


def test_rms_norm_with_a_frozen_weight():
    x, w = uniform(0, (2, 3, 4)), uniform(1, (4,))
    xt, wt = Tensor(x, requires_grad=True), Tensor(w)
    weighted_sum(rms_norm(xt, wt)).backward()
    assert wt.grad is None
    check_gradients(lambda a: weighted_sum(rms_norm(a, Tensor(w))), [x])


@FAST
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds)
def test_silu_mul(shape, seed, backend):
    gate, up = uniform(seed, shape, -4, 4), uniform(seed + 1, shape)
    expected = gate / (1 + np.exp(-gate)) * up
    assert_fused_matches(silu_mul, silu_mul_ref, [gate, up], expected, backend, seed)


# ----- rope ---------------------------------------------------------------------------
def rope_tables(positions, dim, base=10000.0):
    """HF LLaMA's cos/sin: θ_i = base^(−2i/Dh), emb = concat(freqs, freqs)."""
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    freqs = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def rotate_half_np(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


@st.composite
def rope_case(draw):
    b, h, t = (draw(st.integers(1, 3)) for _ in range(3))
    dh = 2 * draw(st.integers(1, 3))
    start = draw(st.integers(0, 50))  # cached decoding: positions need not start at 0
    per_batch = draw(st.booleans())  # cos/sin (T, Dh) or (B, 1, T, Dh)
    positions = np.arange(start, start + t)
    if per_batch:
        positions = positions[None, None, :] + np.arange(b)[:, None, None]
    by_halves, model_layout = draw(st.booleans()), draw(st.booleans())  # the op's two ways; x a view
    return (b, h, t, dh), positions, by_halves, model_layout, draw(seeds)


@FAST
@given(case=rope_case())
def test_rope(case, backend):
    shape, positions, by_halves, model_layout, seed = case
    b, h, t, dh = shape
    x = uniform(seed, (b, t, h, dh)).transpose(0, 2, 1, 3) if model_layout else uniform(seed, shape)
    cos, sin = rope_tables(positions, shape[-1])
    dcos, dsin = backend(cos), backend(sin)
    expected = x * cos + rotate_half_np(x) * sin
    default, Rope.PRODUCT_MAX_DH = Rope.PRODUCT_MAX_DH, (0 if by_halves else 64)
    try:
        assert_fused_matches(lambda t: rope(t, dcos, dsin), lambda t: rope_ref(t, dcos, dsin),
                             [x], expected, backend, seed)
    finally:
        Rope.PRODUCT_MAX_DH = default


@pytest.mark.parametrize("product_max_dh", [0, 64], ids=["halves", "product"])
def test_rope_both_ways_on_the_models_layout(product_max_dh, monkeypatch, backend):
    """x as the model passes it, a (B, H, T, Dh) view of a (B, T, H, Dh) array: rotating by
    halves and by the product x R give the formula's values and gradients, bit for bit the
    same; the product's output is C-contiguous, the halves' output and gradient keep the
    model's (B, T, H, Dh) memory (so the projection's gradient is a reshape, not a copy)."""
    x = uniform(3, (2, 5, 3, 8)).transpose(0, 2, 1, 3)  # (B, H, T, Dh) view
    cos, sin = rope_tables(np.arange(5)[None, None, :] + np.arange(2)[:, None, None], 8)
    dcos, dsin = backend(cos), backend(sin)
    expected = x * cos + rotate_half_np(x) * sin
    monkeypatch.setattr(Rope, "PRODUCT_MAX_DH", product_max_dh)
    assert_fused_matches(lambda t: rope(t, dcos, dsin), lambda t: rope_ref(t, dcos, dsin), [x], expected, backend, 0)
    leaf = Tensor(backend(x), requires_grad=True)
    out = rope(leaf, dcos, dsin)
    out.backward(backend(uniform(4, out.shape)))
    if product_max_dh:
        assert out.data.flags.c_contiguous
    else:
        assert out.data.transpose(0, 2, 1, 3).flags.c_contiguous
        assert leaf.grad.transpose(0, 2, 1, 3).flags.c_contiguous
    monkeypatch.setattr(Rope, "PRODUCT_MAX_DH", 64 - product_max_dh)  # the other way
    other = Tensor(backend(x), requires_grad=True)
    other_out = rope(other, dcos, dsin)
    other_out.backward(backend(uniform(4, out.shape)))
    np.testing.assert_array_equal(to_numpy(out.data), to_numpy(other_out.data))
    np.testing.assert_array_equal(to_numpy(leaf.grad), to_numpy(other.grad))


def test_rope_is_a_rotation_that_sees_only_relative_positions():
    dh = 8
    q, k = uniform(0, (dh,)), uniform(1, (dh,))

    def at(v, pos):
        cos, sin = rope_tables([pos], dh)
        return rope(Tensor(v[None]), cos, sin).data[0]

    np.testing.assert_allclose(np.linalg.norm(at(q, 17)), np.linalg.norm(q), rtol=1e-12)
    # <R_m q, R_n k> depends on m − n only.
    np.testing.assert_allclose(at(q, 7) @ at(k, 3), at(q, 104) @ at(k, 100), rtol=1e-10)


# ----- attention ----------------------------------------------------------------------
def attention_np(q, k, v, mask=None):
    """Loops, no tricks: query t (position S−T+t) reads keys s ≤ its position that are
    real tokens; a query with no such key (a left-padding position) outputs 0."""
    batch, heads, tq, dh = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = np.empty_like(q)
    for b in range(batch):
        for h in range(heads):
            kk, vv = k[b, h // group], v[b, h // group]
            scores = q[b, h] @ kk.T / math.sqrt(dh)
            for t in range(tq):
                allowed = np.arange(tk) <= tk - tq + t
                if mask is not None:
                    allowed &= mask[b].astype(bool)
                if allowed.any():
                    p = softmax_np(scores[t][allowed])
                    out[b, h, t] = p @ vv[allowed]
                else:
                    out[b, h, t] = 0.0
    return out


def fully_masked_rows(batch, tq, tk, mask):
    """(B, T) True where query t can read no key."""
    if mask is None:
        return np.zeros((batch, tq), dtype=bool)
    causal = np.arange(tk)[None, :] <= (np.arange(tq)[:, None] + tk - tq)  # (T, S)
    return ~(causal[None] & mask[:, None, :].astype(bool)).any(axis=-1)


@st.composite
def attention_case(draw):
    batch, kv_heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    tk = draw(st.integers(1, 5))
    tq = draw(st.integers(1, tk))  # T < S: the queries are the last T positions
    dh = draw(st.integers(1, 4))
    mask = None
    if draw(st.booleans()):
        pads = [draw(st.integers(0, tk - 1)) for _ in range(batch)]  # left padding
        mask = np.arange(tk)[None, :] >= np.array(pads)[:, None]
    seed = draw(seeds)
    q = uniform(seed, (batch, kv_heads * group, tq, dh))
    k = uniform(seed + 1, (batch, kv_heads, tk, dh))
    v = uniform(seed + 2, (batch, kv_heads, tk, dh))
    return q, k, v, mask, seed


@SLOW
@given(case=attention_case())
def test_attention(case, backend):
    q, k, v, mask, seed = case
    dmask = None if mask is None else backend(mask)
    fused = lambda a, b, c: attention(a, b, c, dmask)  # noqa: E731
    ref = lambda a, b, c: attention_ref(a, b, c, dmask)  # noqa: E731
    expected = attention_np(q, k, v, mask)

    out_f, grads_f = value_and_grads(fused, [q, k, v], backend, seed)
    out_r, grads_r = value_and_grads(ref, [q, k, v], backend, seed)
    np.testing.assert_allclose(out_f, out_r, **TIGHT)
    np.testing.assert_allclose(out_f, expected, **TIGHT)
    for name, gf, gr in zip("qkv", grads_f, grads_r):
        np.testing.assert_allclose(gf, gr, rtol=1e-10, atol=1e-12, err_msg=f"d{name}")
    with no_grad():  # without gradients the output, not the probabilities, is normalized
        plain = attention(*(Tensor(backend(a)) for a in (q, k, v)), dmask).data
    np.testing.assert_allclose(to_numpy(plain), expected, **TIGHT)

    # A fully masked row outputs a constant 0: its gradient is 0 and so are its
    # central differences; every other row is checked as usual.
    check_gradients(lambda a, b, c: weighted_sum(attention(a, b, c, mask), seed), [q, k, v])
    dead = fully_masked_rows(q.shape[0], q.shape[2], k.shape[2], mask)  # (B, T)
    assert not out_f.transpose(0, 2, 1, 3)[dead].any()
    assert not grads_f[0].transpose(0, 2, 1, 3)[dead].any()


@pytest.mark.parametrize("block", [1, 2, 3])
def test_attention_query_blocks_agree_with_one_block(block, monkeypatch, backend):
    """Queries in blocks, each reading only the keys up to its last position, give the
    same values and gradients as one block (and as the twin)."""
    q, k, v = uniform(0, (2, 4, 5, 3)), uniform(1, (2, 2, 7, 3)), uniform(2, (2, 2, 7, 3))
    mask = backend(np.array([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=bool))
    fused = lambda a, b, c: attention(a, b, c, mask)  # noqa: E731
    expected, expected_grads = value_and_grads(
        lambda a, b, c: attention_ref(a, b, c, mask), [q, k, v], backend)
    monkeypatch.setattr(Attention, "QUERY_BLOCK", block)
    out, grads = value_and_grads(fused, [q, k, v], backend)
    np.testing.assert_allclose(out, expected, **TIGHT)
    for name, got, want in zip("qkv", grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"d{name}")
    # the causal mask alone (no padding) masks only each block's last keys
    unpadded, unpadded_grads = value_and_grads(lambda a, b, c: attention_ref(a, b, c), [q, k, v], backend)
    out, grads = value_and_grads(lambda a, b, c: attention(a, b, c), [q, k, v], backend)
    np.testing.assert_allclose(out, unpadded, **TIGHT)
    for name, got, want in zip("qkv", grads, unpadded_grads):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"d{name}")


def test_attention_last_queries_match_the_full_pass():
    """Cached decoding: the last T queries against all S keys == the last T rows of T = S."""
    q, k, v = uniform(0, (2, 4, 6, 3)), uniform(1, (2, 2, 6, 3)), uniform(2, (2, 2, 6, 3))
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=bool)
    full = attention(Tensor(q), Tensor(k), Tensor(v), mask).data
    for t in (1, 2, 5):
        last = attention(Tensor(q[:, :, -t:]), Tensor(k), Tensor(v), mask).data
        np.testing.assert_allclose(last, full[:, :, -t:], **TIGHT)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3]),
       keys=st.integers(1, 9), dh=st.sampled_from([2, 8, 64]), seed=seeds)
def test_one_query_path_is_the_blocked_path_bit_for_bit(batch, kv_heads, group, keys, dh, seed):
    """Decoding's single query (no gradients, no padding) skips the mask and the block loop; its
    output is bitwise that of the blocked path, here run with an all-zero padding bias. k and v
    are views into a larger buffer, as the KV cache passes them."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, kv_heads * group, 1, dh)).astype(np.float32)
    cache = rng.standard_normal((2, batch, kv_heads, keys + 3, dh)).astype(np.float32)
    k, v = cache[0][:, :, :keys], cache[1][:, :, :keys]
    zero_bias = np.zeros((batch, 1, 1, keys), np.float32)
    with no_grad():
        fast = attention(Tensor(q), Tensor(k), Tensor(v)).data
        blocked = Attention.apply(Tensor(q), Tensor(k), Tensor(v), zero_bias, causal_only=False).data
    assert fast.shape == q.shape
    np.testing.assert_array_equal(fast, blocked)
    np.testing.assert_allclose(fast, attention_np(q.astype(np.float64), k, v, None), rtol=1e-5, atol=1e-6)


def test_attention_mask_of_all_true_equals_no_mask():
    q, k, v = uniform(0, (2, 2, 3, 4)), uniform(1, (2, 1, 3, 4)), uniform(2, (2, 1, 3, 4))
    np.testing.assert_allclose(
        attention(Tensor(q), Tensor(k), Tensor(v), np.ones((2, 3), dtype=bool)).data,
        attention(Tensor(q), Tensor(k), Tensor(v)).data, **TIGHT)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fn", [attention, attention_ref], ids=["fused", "ref"])
def test_attention_fully_masked_rows_stay_finite(dtype, fn, backend):
    """Left padding: the first rows of batch 0 and all of batch 1 read no real key;
    they output 0, and nothing (values or gradients) turns NaN or inf."""
    q = uniform(0, (2, 4, 5, 8)).astype(dtype) * 30  # large scores, too
    k, v = (uniform(s, (2, 2, 5, 8)).astype(dtype) * 30 for s in (1, 2))
    mask = backend(np.array([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=bool))
    leaves = [Tensor(backend(a), requires_grad=True) for a in (q, k, v)]
    out = fn(*leaves, mask)
    values = to_numpy(out.data)
    assert np.isfinite(values).all()
    assert not values[0, :, :3].any() and not values[1].any()
    weighted_sum(out).backward()
    for leaf in leaves:
        assert np.isfinite(to_numpy(leaf.grad)).all()


def test_attention_bias_is_causal_with_an_offset_and_padding():
    xp = np
    bias = attention_bias(2, 4, np.array([[0, 1, 1, 1]], dtype=bool), np.float64, xp)
    assert bias.shape == (1, 1, 2, 4)
    low = np.finfo(np.float64).min
    # query 0 sits at position 2, query 1 at position 3; key 0 is padding.
    np.testing.assert_array_equal(bias[0, 0], [[low, 0, 0, low], [low, 0, 0, 0]])
    assert attention_bias(3, 3, None, np.float32, xp).dtype == np.float32
