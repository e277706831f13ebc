"""The fused Linear + low-rank update (LoRA's forward) against its twin, a NumPy formula
and central differences, for every combination of trainable inputs."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minipeft.autograd import Tensor
from minipeft.autograd.fused import low_rank_linear, low_rank_linear_ref
from minipeft.backend import to_numpy
from tests.autograd.test_fused import FAST, TIGHT, assert_fused_matches, seeds, uniform
from tests.helpers.gradcheck import weighted_sum


@st.composite
def low_rank_case(draw):
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=40))  # up to 1,600 rows: every product path
    n_in, n_out, rank = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    return lead + (n_in,), n_out, rank, draw(st.booleans()), draw(st.floats(-3, 3)), draw(seeds)


@FAST
@given(case=low_rank_case())
def test_low_rank_linear(case, backend):
    x_shape, n_out, rank, with_bias, scale, seed = case
    n_in = x_shape[-1]
    x, w = uniform(seed, x_shape), uniform(seed + 1, (n_out, n_in))
    a, b, bias = uniform(seed + 2, (rank, n_in)), uniform(seed + 3, (n_out, rank)), uniform(seed + 4, (n_out,))
    expected = x @ w.T + scale * (x @ a.T) @ b.T + (bias if with_bias else 0)
    if x.size > 200:  # central differences over every element would take long: the twin covers it
        out_f, grads_f = _value_and_grads(low_rank_linear, x, w, a, b, scale, bias if with_bias else None, backend)
        out_r, grads_r = _value_and_grads(low_rank_linear_ref, x, w, a, b, scale, bias if with_bias else None, backend)
        np.testing.assert_allclose(out_f, expected, **TIGHT)
        np.testing.assert_allclose(out_f, out_r, **TIGHT)
        for gf, gr in zip(grads_f, grads_r):
            np.testing.assert_allclose(gf, gr, rtol=1e-10, atol=1e-12)
        return
    if with_bias:
        assert_fused_matches(lambda *t: low_rank_linear(*t[:4], scale, t[4]),
                             lambda *t: low_rank_linear_ref(*t[:4], scale, t[4]), [x, w, a, b, bias],
                             expected, backend, seed)
    else:
        assert_fused_matches(lambda *t: low_rank_linear(*t, scale), lambda *t: low_rank_linear_ref(*t, scale),
                             [x, w, a, b], expected, backend, seed)


def _value_and_grads(fn, x, w, a, b, scale, bias, backend):
    leaves = [Tensor(backend(v), requires_grad=True) for v in (x, w, a, b) + (() if bias is None else (bias,))]
    out = fn(*leaves[:4], scale, leaves[4] if bias is not None else None)
    weighted_sum(out).backward()
    return to_numpy(out.data), [to_numpy(t.grad) for t in leaves]


@pytest.mark.parametrize("trainable", [(True, False, True, True), (False, False, True, True),
                                       (True, False, False, True), (True, True, True, False)])
def test_only_the_wanted_gradients_are_formed(trainable):
    """The PEFT case (W frozen), a first layer (x constant), and others: frozen inputs get no
    gradient, the rest equal the twin's."""
    x, w, a, b = uniform(0, (2, 5, 4)), uniform(1, (3, 4)), uniform(2, (2, 4)), uniform(3, (3, 2))
    results = []
    for fn in (low_rank_linear, low_rank_linear_ref):
        leaves = [Tensor(v, requires_grad=flag) for v, flag in zip((x, w, a, b), trainable)]
        weighted_sum(fn(*leaves, 0.5)).backward()
        results.append([t.grad for t in leaves])
    for flag, fused, ref in zip(trainable, *results):
        if not flag:
            assert fused is None and ref is None
        else:
            np.testing.assert_allclose(fused, ref, **TIGHT)
