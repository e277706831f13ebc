"""Primitive ops and composites: forward against plain NumPy, backward against float64
central differences (shapes drawn by hypothesis), plus the engine's own contract:
accumulation, no_grad, frozen inputs, skipped weight gradients, freed graphs,
independent .grad arrays and unbroadcast.
"""
from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minipeft.autograd import Tensor, is_grad_enabled, no_grad, ops, unbroadcast
from minipeft.autograd.fused import linear
from minipeft.autograd.fused.layers import Linear
from minipeft.backend import to_numpy
from tests.helpers.gradcheck import check_gradients, numerical_gradient, weighted_sum

FAST = settings(max_examples=20, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)
seeds = st.integers(0, 2**32 - 1)


def uniform(seed, shape, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape)


def away_from_zero(seed, shape, margin=0.5, high=2.0):
    """Values with margin <= |x| <= high (for division, relu's kink, logs of |x|)."""
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(margin, high, size=shape)


def distinct(seed, shape):
    """Values at least 0.1 apart, so max has no ties within a finite-difference step."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape, dtype=int))
    return (rng.permutation(size) * 0.1 + rng.uniform(-1, 1)).reshape(shape)


def forward(fn, *arrays, to_backend):
    """fn on constant tensors placed by the backend fixture, returned as NumPy."""
    out = fn(*(Tensor(to_backend(a)) for a in arrays))
    assert not out.requires_grad
    return to_numpy(out.data)


def sigmoid_np(x):
    return 1 / (1 + np.exp(-x))


# ----- elementwise unary ----------------------------------------------------------
# name -> (tensor function, NumPy function, input generator)
UNARY = {
    "neg": (lambda x: -x, lambda x: -x, uniform),
    "exp": (ops.exp, np.exp, uniform),
    "log": (ops.log, np.log, lambda s, sh: uniform(s, sh, 0.5, 3.0)),
    "tanh": (ops.tanh, np.tanh, uniform),
    "sigmoid": (ops.sigmoid, sigmoid_np, uniform),
    "relu": (ops.relu, lambda x: np.maximum(x, 0), lambda s, sh: away_from_zero(s, sh, 0.1)),
    "pow2": (lambda x: x**2, lambda x: x**2, uniform),
    "pow3": (lambda x: ops.pow(x, 3), lambda x: x**3, uniform),
    "pow_half": (lambda x: x**0.5, np.sqrt, lambda s, sh: uniform(s, sh, 0.5, 3.0)),
    "pow_neg": (lambda x: x**-1.5, lambda x: x**-1.5, lambda s, sh: uniform(s, sh, 0.5, 3.0)),
    "sqrt": (ops.sqrt, np.sqrt, lambda s, sh: uniform(s, sh, 0.5, 3.0)),
    "silu": (ops.silu, lambda x: x * sigmoid_np(x), uniform),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@FAST
@given(shape=shapes, seed=seeds)
def test_unary_forward(name, shape, seed, backend):
    fn, ref, draw = UNARY[name]
    x = draw(seed, shape)
    np.testing.assert_allclose(forward(fn, x, to_backend=backend), ref(x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(UNARY))
@FAST
@given(shape=shapes, seed=seeds)
def test_unary_backward(name, shape, seed):
    fn, _, draw = UNARY[name]
    check_gradients(lambda x: weighted_sum(fn(x), seed), [draw(seed, shape)])


# ----- elementwise binary, with broadcasting --------------------------------------
BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
    "div": (lambda a, b: a / b, np.divide),
}
pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)


@pytest.mark.parametrize("name", sorted(BINARY))
@FAST
@given(shapes2=pairs, seed=seeds)
def test_binary_forward(name, shapes2, seed, backend):
    fn, ref = BINARY[name]
    a = uniform(seed, shapes2.input_shapes[0])
    b = away_from_zero(seed + 1, shapes2.input_shapes[1])
    out = forward(fn, a, b, to_backend=backend)
    assert out.shape == shapes2.result_shape
    np.testing.assert_allclose(out, ref(a, b), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(BINARY))
@FAST
@given(shapes2=pairs, seed=seeds)
def test_binary_backward(name, shapes2, seed):
    fn, _ = BINARY[name]
    a = uniform(seed, shapes2.input_shapes[0])
    b = away_from_zero(seed + 1, shapes2.input_shapes[1])
    check_gradients(lambda x, y: weighted_sum(fn(x, y), seed), [a, b])


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_named_broadcast_case(name):
    """(3, 1, 4) against (4,): both a leading axis added and a stretched axis."""
    fn, ref = BINARY[name]
    a, b = uniform(1, (3, 1, 4)), away_from_zero(2, (4,))
    np.testing.assert_allclose(fn(Tensor(a), Tensor(b)).data, ref(a, b))
    ga, gb = check_gradients(lambda x, y: weighted_sum(fn(x, y)), [a, b])
    assert ga.shape == (3, 1, 4) and gb.shape == (4,)


SCALAR_CASES = {
    "x+c": (lambda x: x + 2.5, lambda x: x + 2.5),
    "c+x": (lambda x: 2.5 + x, lambda x: 2.5 + x),
    "x-c": (lambda x: x - 2.5, lambda x: x - 2.5),
    "c-x": (lambda x: 2.5 - x, lambda x: 2.5 - x),
    "x*c": (lambda x: x * -1.5, lambda x: x * -1.5),
    "c*x": (lambda x: 3 * x, lambda x: 3 * x),
    "x/c": (lambda x: x / 4.0, lambda x: x / 4.0),
    "c/x": (lambda x: 3.0 / x, lambda x: 3.0 / x),
    "ndarray+x": (lambda x: np.arange(4.0) + x, lambda x: np.arange(4.0) + x),
    "ndarray@x": (lambda x: np.ones((2, 3)) @ x.reshape(3, 4)[:, :1],
                  lambda x: np.ones((2, 3)) @ x.reshape(3, 4)[:, :1]),
}


@pytest.mark.parametrize("name", sorted(SCALAR_CASES))
def test_constants_on_either_side(name):
    fn, ref = SCALAR_CASES[name]
    x = away_from_zero(3, (3, 4))
    out = fn(Tensor(x))
    assert isinstance(out, Tensor)
    np.testing.assert_allclose(out.data, ref(x))
    check_gradients(lambda t: weighted_sum(fn(t)), [x])


def test_python_constants_keep_the_tensor_dtype():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    for out in (x + 1, 2.0 * x, x / 3, 1 - x, x**2):
        assert out.dtype == np.float32


# ----- where ------------------------------------------------------------------------
@FAST
@given(shapes3=hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=4),
       seed=seeds)
def test_where(shapes3, seed, backend):
    sa, sb, sc = shapes3.input_shapes
    a, b = uniform(seed, sa), uniform(seed + 1, sb)
    cond = np.random.default_rng(seed).random(sc) < 0.5
    out = ops.where(backend(cond), Tensor(backend(a)), Tensor(backend(b)))
    np.testing.assert_array_equal(to_numpy(out.data), np.where(cond, a, b))
    ga, gb = check_gradients(lambda x, y: weighted_sum(ops.where(cond, x, y), seed), [a, b])
    assert ga.shape == sa and gb.shape == sb


def test_where_with_a_constant_branch():
    x = uniform(0, (2, 3))
    cond = x > 0
    out = ops.where(cond, Tensor(x), 0.0)
    np.testing.assert_array_equal(out.data, np.where(cond, x, 0.0))
    check_gradients(lambda t: weighted_sum(ops.where(cond, t, 0.0)), [x])


# ----- matmul -----------------------------------------------------------------------
@st.composite
def matmul_shapes(draw):
    batch = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2,
                                                   max_side=3))
    n, k, m = (draw(st.integers(1, 4)) for _ in range(3))
    a_shape, b_shape = batch.input_shapes[0] + (n, k), batch.input_shapes[1] + (k, m)
    vector = draw(st.sampled_from([None, "a", "b", "both"]))  # 1-D operands, as NumPy allows
    if vector in ("a", "both"):
        a_shape = (k,)
    if vector in ("b", "both"):
        b_shape = (k,)
    return a_shape, b_shape


@FAST
@given(ab=matmul_shapes(), seed=seeds)
def test_matmul_forward(ab, seed, backend):
    a, b = uniform(seed, ab[0]), uniform(seed + 1, ab[1])
    np.testing.assert_allclose(forward(ops.matmul, a, b, to_backend=backend), a @ b,
                               rtol=1e-12, atol=1e-14)


@FAST
@given(ab=matmul_shapes(), seed=seeds)
def test_matmul_backward(ab, seed):
    a, b = uniform(seed, ab[0]), uniform(seed + 1, ab[1])
    check_gradients(lambda x, y: weighted_sum(x @ y, seed), [a, b])


def test_matmul_broadcast_batch_named_case():
    """A (2, 1, 3, 4) batch against a (5, 4, 2) one: the batch axes broadcast to (2, 5)."""
    a, b = uniform(0, (2, 1, 3, 4)), uniform(1, (5, 4, 2))
    assert (Tensor(a) @ Tensor(b)).shape == (2, 5, 3, 2)
    check_gradients(lambda x, y: weighted_sum(x @ y), [a, b])


# ----- reductions -------------------------------------------------------------------
@st.composite
def shape_and_axis(draw, min_dims=1):
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=3, min_side=1, max_side=4))
    ndim = len(shape)
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        axis = None
    elif kind == "int":
        axis = draw(st.integers(-ndim, ndim - 1))
    else:
        axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        axis = tuple(ax - ndim if draw(st.booleans()) else ax for ax in axes)
    return shape, axis, draw(st.booleans())


@FAST
@given(case=shape_and_axis(), seed=seeds)
def test_sum(case, seed, backend):
    shape, axis, keepdims = case
    x = uniform(seed, shape)
    fn = lambda t: ops.sum(t, axis=axis, keepdims=keepdims)  # noqa: E731
    expected = x.sum(axis=axis, keepdims=keepdims)
    out = forward(fn, x, to_backend=backend)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
    check_gradients(lambda t: weighted_sum(fn(t), seed), [x])


@FAST
@given(case=shape_and_axis(), seed=seeds)
def test_max(case, seed, backend):
    shape, axis, keepdims = case
    x = distinct(seed, shape)
    fn = lambda t: ops.max(t, axis=axis, keepdims=keepdims)  # noqa: E731
    expected = x.max(axis=axis, keepdims=keepdims)
    out = forward(fn, x, to_backend=backend)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)
    check_gradients(lambda t: weighted_sum(fn(t), seed), [x])


def test_max_splits_the_gradient_between_ties():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0, 0.5, 0.5], [0.5, 0, 0.5]])


@FAST
@given(case=shape_and_axis(), seed=seeds)
def test_mean(case, seed, backend):
    shape, axis, keepdims = case
    x = uniform(seed, shape)
    fn = lambda t: ops.mean(t, axis=axis, keepdims=keepdims)  # noqa: E731
    np.testing.assert_allclose(forward(fn, x, to_backend=backend),
                               x.mean(axis=axis, keepdims=keepdims), rtol=1e-12, atol=1e-14)
    check_gradients(lambda t: weighted_sum(fn(t), seed), [x])


# ----- shape ops --------------------------------------------------------------------
@FAST
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds,
       target=st.sampled_from(["flat", "minus1", "reversed", "column", "leading1"]))
def test_reshape(shape, seed, target, backend):
    size = int(np.prod(shape))
    new = {"flat": (size,), "minus1": (-1,), "reversed": tuple(reversed(shape)),
           "column": (size, 1), "leading1": (1, *shape)}[target]
    x = uniform(seed, shape)
    np.testing.assert_array_equal(forward(lambda t: t.reshape(new), x, to_backend=backend),
                                  x.reshape(new))
    check_gradients(lambda t: weighted_sum(ops.reshape(t, new), seed), [x])


@FAST
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=3), seed=seeds)
def test_transpose(data, shape, seed, backend):
    axes = data.draw(st.one_of(st.none(), st.permutations(range(len(shape)))))
    axes = None if axes is None else tuple(axes)
    x = uniform(seed, shape)
    np.testing.assert_array_equal(forward(lambda t: ops.transpose(t, axes), x, to_backend=backend),
                                  x.transpose(axes))
    check_gradients(lambda t: weighted_sum(ops.transpose(t, axes), seed), [x])


def test_transpose_spellings():
    x = uniform(0, (2, 3, 4))
    t = Tensor(x)
    np.testing.assert_array_equal(t.T.data, x.T)
    np.testing.assert_array_equal(t.transpose().data, x.transpose())
    np.testing.assert_array_equal(t.transpose(2, 0, 1).data, x.transpose(2, 0, 1))
    np.testing.assert_array_equal(t.transpose((1, 0, 2)).data, x.transpose((1, 0, 2)))


def test_views_with_nothing_to_record_are_plain_views():
    """Reshape / transpose of a tensor without gradient (or under no_grad) is a view of its
    memory and records no node; with gradients wanted it is recorded and the gradient flows."""
    x = uniform(0, (2, 3, 4))
    frozen, leaf = Tensor(x), Tensor(x, requires_grad=True)
    for out in (frozen.reshape(6, 4), frozen.transpose(2, 0, 1)):
        assert np.shares_memory(out.data, x) and out._fn is None and not out.requires_grad
    with no_grad():
        out = leaf.reshape(6, 4).transpose()
    assert np.shares_memory(out.data, leaf.data) and out._fn is None and not out.requires_grad
    recorded = leaf.reshape(6, 4).transpose()
    assert recorded.requires_grad and recorded._fn is not None
    recorded.sum().backward()
    np.testing.assert_array_equal(leaf.grad, np.ones_like(x))


@FAST
@given(data=st.data(), shape=hnp.array_shapes(min_dims=2, max_dims=4, max_side=4), seed=seeds)
def test_swapaxes(data, shape, seed, backend):
    nd = len(shape)
    a1, a2 = data.draw(st.integers(-nd, nd - 1)), data.draw(st.integers(-nd, nd - 1))
    x = uniform(seed, shape)
    fn = lambda t: ops.swapaxes(t, a1, a2)  # noqa: E731
    np.testing.assert_array_equal(forward(fn, x, to_backend=backend), np.swapaxes(x, a1, a2))
    check_gradients(lambda t: weighted_sum(fn(t), seed), [x])


# ----- indexing ---------------------------------------------------------------------
@st.composite
def basic_index(draw, shape):
    """A tuple of slices (with steps, negative bounds) and ints, maybe an Ellipsis / None."""
    parts = []
    for n in shape:
        kind = draw(st.sampled_from(["slice", "int", "all"]))
        if kind == "int":
            parts.append(draw(st.integers(-n, n - 1)))
        elif kind == "all":
            parts.append(slice(None))
        else:
            start = draw(st.one_of(st.none(), st.integers(-n, n)))
            stop = draw(st.one_of(st.none(), st.integers(-n, n)))
            step = draw(st.sampled_from([None, 1, 2, -1, -2]))
            parts.append(slice(start, stop, step))
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), None)
    return tuple(parts)


@FAST
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds)
def test_getitem_basic(data, shape, seed, backend):
    index = data.draw(basic_index(shape))
    x = uniform(seed, shape)
    fn = lambda t: t[index]  # noqa: E731
    np.testing.assert_array_equal(forward(fn, x, to_backend=backend), x[index])
    if x[index].size:
        check_gradients(lambda t: weighted_sum(fn(t), seed), [x])


@FAST
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds)
def test_getitem_int_arrays_with_repeats(data, shape, seed, backend):
    """Integer-array indexing takes the scatter-add path: repeated rows add up."""
    n = shape[0]
    ids = np.array(data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=6)))
    ids = np.concatenate([ids, ids[:1]])  # at least one repeat
    x = uniform(seed, shape)
    out = Tensor(backend(x))[backend(ids)]
    np.testing.assert_array_equal(to_numpy(out.data), x[ids])

    leaf = Tensor(backend(x), requires_grad=True)
    leaf[backend(ids)].sum().backward()
    counts = np.zeros(n)
    np.add.at(counts, ids, 1.0)
    np.testing.assert_array_equal(to_numpy(leaf.grad), np.broadcast_to(
        counts.reshape((n,) + (1,) * (len(shape) - 1)), shape))
    check_gradients(lambda t: weighted_sum(t[ids], seed), [x])


def test_getitem_advanced_mixed_indices():
    x = uniform(0, (4, 5, 3))
    rows, cols = np.array([0, 3, 0, 3]), np.array([1, 1, 1, 4])
    cases = [
        (rows, cols),                     # paired arrays: picks (0,1) twice
        (slice(None), np.array([2, 2, 0])),  # a slice then an array with a repeat
        (np.array([[1, 1], [2, 1]]),),    # a 2-D index array
        (1, np.array([0, 0]), slice(1, None)),
        (np.int64(2),),                   # a NumPy integer
    ]
    for index in cases:
        np.testing.assert_array_equal(Tensor(x)[index].data, x[index])
        check_gradients(lambda t, index=index: weighted_sum(t[index]), [x])


def test_getitem_accepts_a_tensor_index():
    x = uniform(0, (4, 2))
    ids = Tensor(np.array([3, 3, 1]))
    np.testing.assert_array_equal(Tensor(x)[ids].data, x[[3, 3, 1]])


def test_plain_fancy_assignment_would_lose_repeats():
    """Why GetItem scatter-adds: ``out[ids] += g`` keeps one of the repeated writes."""
    ids = np.array([1, 1, 1])
    naive = np.zeros(3)
    naive[ids] += 1.0
    assert naive[1] == 1.0
    x = Tensor(np.zeros(3), requires_grad=True)
    x[ids].sum().backward()
    assert x.grad[1] == 3.0


# ----- concat and cast --------------------------------------------------------------
@FAST
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds,
       count=st.integers(1, 3))
def test_concat(data, shape, seed, count, backend):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = [data.draw(st.integers(1, 3)) for _ in range(count)]
    parts = []
    for i, n in enumerate(sizes):
        s = list(shape)
        s[axis] = n
        parts.append(uniform(seed + i, tuple(s)))
    fn = lambda *ts: ops.concat(list(ts), axis=axis)  # noqa: E731
    np.testing.assert_array_equal(forward(fn, *parts, to_backend=backend),
                                  np.concatenate(parts, axis=axis))
    grads = check_gradients(lambda *ts: weighted_sum(fn(*ts), seed), parts)
    assert [g.shape for g in grads] == [p.shape for p in parts]


def test_cast_forward_and_backward_dtypes(backend):
    x = uniform(0, (3, 4))
    leaf = Tensor(backend(x), requires_grad=True)
    low = ops.cast(leaf, np.float32)
    assert low.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(low.data), x.astype(np.float32))
    (low * backend(np.arange(4, dtype=np.float32))).sum().backward()
    assert leaf.grad.dtype == np.float64
    np.testing.assert_array_equal(to_numpy(leaf.grad), np.broadcast_to(np.arange(4.0), (3, 4)))


@FAST
@given(shape=shapes, seed=seeds)
def test_cast_gradcheck(shape, seed):
    """A float64 round trip through Cast is exact, so central differences apply."""
    check_gradients(lambda t: weighted_sum(ops.cast(ops.cast(t, np.float64) * 2, np.float64),
                                           seed), [uniform(seed, shape)])


def test_float32_leaf_gets_a_float32_grad_through_a_float64_cast():
    leaf = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    (ops.cast(leaf, np.float64) * 3).sum().backward()
    assert leaf.grad.dtype == np.float32
    np.testing.assert_array_equal(leaf.grad, [3, 3, 3])


# ----- dropout ----------------------------------------------------------------------
def test_dropout_p0_and_eval_are_the_identity():
    x = Tensor(uniform(0, (4, 5)), requires_grad=True)
    assert ops.dropout(x, 0.0, np.random.default_rng(0)) is x
    assert ops.dropout(x, 0.5, np.random.default_rng(0), training=False) is x


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_scales_kept_values_and_is_seeded(p, backend):
    x = uniform(0, (64, 64), 0.5, 2.0)  # nonzero, so zeros in the output mean "dropped"
    leaf = Tensor(backend(x), requires_grad=True)
    out = ops.dropout(leaf, p, np.random.default_rng(7))
    y = to_numpy(out.data)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-12)
    assert abs(1 - kept.mean() - p) < 0.05  # 4096 draws: the dropped fraction is near p
    # The mask comes from the host generator: same seed, same mask, on every backend.
    expected_keep = np.random.default_rng(7).random(x.shape) >= p
    np.testing.assert_array_equal(kept, expected_keep)
    again = to_numpy(ops.dropout(Tensor(backend(x)), p, np.random.default_rng(7)).data)
    np.testing.assert_array_equal(again, y)
    other = to_numpy(ops.dropout(Tensor(backend(x)), p, np.random.default_rng(8)).data)
    assert not np.array_equal(other, y)
    # Backward: the same mask and scale.
    out.sum().backward()
    np.testing.assert_allclose(to_numpy(leaf.grad), kept / (1 - p), rtol=1e-12)


def test_dropout_p1_drops_everything_without_nan():
    x = Tensor(uniform(0, (3, 3)), requires_grad=True)
    out = ops.dropout(x, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out.data, np.zeros((3, 3)))
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, np.zeros((3, 3)))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_rejects_a_bad_probability(p):
    with pytest.raises(ValueError, match="p="):
        ops.dropout(Tensor(np.ones(3)), p, np.random.default_rng(0))


# ----- the engine -------------------------------------------------------------------
def test_gradients_accumulate_over_several_uses():
    x = uniform(0, (3,))
    leaf = Tensor(x, requires_grad=True)
    (leaf * leaf + 3 * leaf + ops.exp(leaf)).sum().backward()
    np.testing.assert_allclose(leaf.grad, 2 * x + 3 + np.exp(x))


def test_grad_accumulates_across_backward_calls():
    leaf = Tensor(uniform(0, (2, 3)), requires_grad=True)
    (leaf * 2).sum().backward()
    (leaf * 5).sum().backward()
    np.testing.assert_array_equal(leaf.grad, np.full((2, 3), 7.0))


def test_diamond_graph():
    """x feeds two branches that meet again: the gradient arrives by both paths."""
    x = uniform(0, (2, 2))
    check_gradients(lambda t: weighted_sum(ops.tanh(t) * ops.sigmoid(t) + t @ t), [x])


def test_the_graph_keeps_only_the_arrays_ops_saved():
    """An intermediate array no op saved for backward is freed when the forward drops it
    (the graph points to functions, not to tensors); a saved one lives until backward."""
    x = Tensor(uniform(0, (3, 4)), requires_grad=True)
    shifted = x + 1  # Add saves nothing
    squared = shifted * shifted  # Mul saves its operands
    doubled = squared + squared
    unsaved, saved = weakref.ref(doubled.data), weakref.ref(shifted.data)
    loss = (doubled + 0.5).sum()
    del shifted, squared, doubled
    gc.collect()
    assert unsaved() is None, "an array no op saved was kept alive by the graph"
    assert saved() is not None
    loss.backward()
    np.testing.assert_allclose(x.grad, 4 * (x.data + 1))  # d/dx 2(x+1)²
    gc.collect()
    assert saved() is None  # backward dropped what it used


def test_no_grad_records_nothing():
    x = Tensor(uniform(0, (2, 3)), requires_grad=True)
    assert is_grad_enabled()
    with no_grad():
        assert not is_grad_enabled()
        outs = [x + 1, x * x, x @ x.T, ops.exp(x).sum(), x[0], linear(x, x)]
    assert is_grad_enabled()
    for out in outs:
        assert out.requires_grad is False
        assert out._fn is None


def test_no_grad_restores_the_flag_after_an_exception():
    with pytest.raises(KeyError), no_grad():
        raise KeyError
    assert is_grad_enabled()


def test_no_grad_is_per_thread():
    """As in PyTorch: a thread inside no_grad (say, generating) leaves recording on in the
    others (say, a training step)."""
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def generate():
        with no_grad():
            seen["worker"] = is_grad_enabled()
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        assert inside.wait(10)
        x = Tensor(uniform(0, (2, 3)), requires_grad=True)
        y = (x * x).sum()  # recorded here while the other thread is inside no_grad
        assert is_grad_enabled() and y.requires_grad and y._fn is not None
    finally:
        release.set()
        worker.join(10)
    assert seen["worker"] is False


def test_constants_only_record_nothing():
    out = Tensor(np.ones(3)) * Tensor(np.ones(3))
    assert out.requires_grad is False and out._fn is None


def test_frozen_inputs_get_no_grad():
    x = Tensor(uniform(0, (2, 3)), requires_grad=True)
    frozen = Tensor(uniform(1, (3, 4)))
    out = x @ frozen
    assert out._fn.needs_input_grad == (True, False)
    weighted_sum(out * frozen.sum()).backward()
    assert frozen.grad is None
    assert x.grad is not None


def _record_backward(monkeypatch, cls):
    """Wrap ``cls.backward`` to record what each call returned."""
    calls = []
    original = cls.backward

    def wrapped(self, g):
        result = original(self, g)
        calls.append((self.needs_input_grad, result))
        return result

    monkeypatch.setattr(cls, "backward", wrapped)
    return calls


def test_matmul_skips_the_frozen_weight_gradient(monkeypatch):
    calls = _record_backward(monkeypatch, ops.MatMul)
    x = Tensor(uniform(0, (2, 5, 3)), requires_grad=True)
    weight = Tensor(uniform(1, (3, 4)))
    (x @ weight).sum().backward()
    ((needs, (dx, dw)),) = calls
    assert needs == (True, False)
    assert dx is not None and dw is None
    assert weight.grad is None


def test_linear_skips_the_frozen_weight_gradient(monkeypatch):
    calls = _record_backward(monkeypatch, Linear)
    x = Tensor(uniform(0, (2, 5, 3)), requires_grad=True)
    weight, bias = Tensor(uniform(1, (4, 3))), Tensor(uniform(2, (4,)), requires_grad=True)
    linear(x, weight, bias).sum().backward()
    ((needs, (dx, dw, db)),) = calls
    assert needs == (True, False, True)
    assert dx is not None and dw is None and db is not None
    assert weight.grad is None and bias.grad is not None


def test_backward_twice_on_one_graph_raises():
    x = Tensor(uniform(0, (3,)), requires_grad=True)
    loss = (x * x).sum()
    loss.backward()
    first = x.grad.copy()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    np.testing.assert_array_equal(x.grad, first)


def test_reusing_a_freed_intermediate_raises_instead_of_losing_gradients():
    x = Tensor(uniform(0, (3,)), requires_grad=True)
    hidden = x * 2
    hidden.sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        (hidden * 3).sum().backward()


def test_backward_needs_grad_and_a_scalar():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(2)).sum().backward()
    x = Tensor(np.ones(2), requires_grad=True)
    with pytest.raises(RuntimeError, match="scalar"):
        (x * 2).backward()
    (x * 2).backward(np.array([1.0, 10.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 20.0])


def test_two_leaves_of_one_add_get_distinct_grad_arrays():
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    (a + b).backward(np.array([1.0, 2.0, 3.0]))
    assert a.grad is not b.grad
    a.grad += 100.0
    np.testing.assert_array_equal(b.grad, [1.0, 2.0, 3.0])


@pytest.mark.parametrize("make", [
    lambda a, b: a.reshape(2, 2) + b,
    lambda a, b: a + b.reshape(4),            # a view of the same gradient
    lambda a, b: a + b.T.reshape(4),          # a transposed view
    lambda a, b: a.sum() + b.sum(),           # read-only broadcast views
    lambda a, b: ops.concat([a, b.reshape(4)]).sum(),
], ids=["add", "reshape", "transpose", "sum", "concat"])
def test_leaves_get_their_own_writable_grad_arrays(make):
    a = Tensor(np.ones(4), requires_grad=True)
    b = Tensor(np.ones((2, 2)), requires_grad=True)
    out = make(a, b)
    out.sum().backward() if out.size > 1 else out.backward()
    b_before = b.grad.copy()
    assert not np.shares_memory(a.grad, b.grad)
    a.grad *= 10.0  # an in-place update (clipping, scaling) of one leaf's grad
    a.grad[...] = 0.0
    np.testing.assert_array_equal(b.grad, b_before)
    b.grad += 1.0  # must not raise: .grad is writable


def test_detach_cuts_the_graph():
    x = Tensor(uniform(0, (3,)), requires_grad=True)
    y = (x * 2).detach()
    assert not y.requires_grad
    (x * y).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data)


# ----- unbroadcast ------------------------------------------------------------------
def test_unbroadcast_same_shape_is_a_no_op():
    g = np.ones((2, 3))
    assert unbroadcast(g, (2, 3)) is g


@pytest.mark.parametrize("grad_shape, shape", [
    ((3, 1, 4), (4,)),
    ((2, 3, 4), (3, 1)),
    ((2, 3, 4), ()),
    ((2, 3, 4), (1, 1, 1)),
    ((5, 2), (1, 2)),
    ((5, 2), (5, 1)),
    ((7,), (1,)),
])
def test_unbroadcast_sums_added_and_stretched_axes(grad_shape, shape):
    g = uniform(0, grad_shape)
    out = unbroadcast(g, shape)
    assert out.shape == shape
    # The adjoint of broadcasting: <unbroadcast(g), v> == <g, broadcast(v)>.
    v = uniform(1, shape)
    np.testing.assert_allclose(np.sum(out * v), np.sum(g * np.broadcast_to(v, grad_shape)))


@FAST
@given(shapes2=hnp.mutually_broadcastable_shapes(num_shapes=1, max_dims=3, max_side=4))
def test_unbroadcast_of_ones_counts_the_copies(shapes2):
    (shape,) = shapes2.input_shapes
    full = shapes2.result_shape
    copies = np.prod(full, dtype=int) // max(np.prod(shape, dtype=int), 1)
    np.testing.assert_array_equal(unbroadcast(np.ones(full), shape), np.full(shape, copies))


# ----- the helper itself ------------------------------------------------------------
def test_numerical_gradient_of_a_known_function():
    x = uniform(0, (2, 3))
    grad = numerical_gradient(lambda arrays: np.sum(arrays[0] ** 3), [x], 0)
    np.testing.assert_allclose(grad, 3 * x**2, rtol=1e-7)


def test_check_gradients_catches_a_wrong_backward():
    class Wrong(ops.Function):
        def forward(self, a):
            return a * a

        def backward(self, g):
            return g * 3  # should be 2a

    with pytest.raises(AssertionError, match="input 0"):
        check_gradients(lambda t: weighted_sum(Wrong.apply(t)), [uniform(0, (3,))])
