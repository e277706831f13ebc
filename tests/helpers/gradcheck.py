"""Float64 central-difference gradient checks: the executable definition of "the
backward is right".

``numerical_gradient`` differentiates any scalar function of NumPy arrays;
``check_gradients`` runs a function of Tensors forward and backward and compares
every leaf's ``.grad`` with the numerical gradient. Tests of ops, layers, the model
and every PEFT method use these, so keep them independent of those layers.

A scalar output that is a plain ``.sum()`` makes many mistakes invisible (a
transposed or permuted gradient still sums the same), so reduce outputs with
:func:`weighted_sum`, which weights every element by a fixed random number.
"""
from __future__ import annotations

import numpy as np

from minipeft.autograd import Tensor, no_grad
from minipeft.backend import to_device, to_numpy


def numerical_gradient(f, arrays, index, eps=1e-6):
    """d f(arrays) / d arrays[index] by central differences in float64.

    ``f`` takes a list of float64 NumPy arrays and returns a scalar (a Python
    number, a 0-d / size-1 array, or anything ``float()`` accepts). The arrays
    are copied, so the caller's are never touched.
    """
    arrays = [np.array(a, dtype=np.float64, copy=True) for a in arrays]
    x = arrays[index]
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        original = x[i]
        x[i] = original + eps
        plus = float(f(arrays))
        x[i] = original - eps
        minus = float(f(arrays))
        x[i] = original
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def weighted_sum(out, seed=0):
    """Σ out ⊙ w with fixed random weights w ~ U(-1, 1) of out's shape: a scalar
    whose gradient w.r.t. ``out`` is w, so every output element is checked."""
    w = np.random.default_rng(seed).uniform(-1.0, 1.0, size=out.shape)
    w = to_device(w.astype(out.dtype), out.device)
    return (out * w).sum()


def check_gradients(f_tensor, arrays, rtol=1e-5, atol=1e-7, eps=1e-6, wrt=None, device="cpu"):
    """Assert that backward through ``f_tensor`` equals float64 central differences.

    ``f_tensor(*tensors)`` must return a scalar Tensor (one per array in
    ``arrays``, same order). Each array becomes a float64 leaf, with
    ``requires_grad=True`` when its index is in ``wrt`` (default: all). Integer
    inputs such as labels or ids belong in the closure, not in ``arrays``.
    ``device`` places the leaves ('cpu' or 'cuda'). Returns the analytic gradients
    as NumPy arrays, in ``wrt`` order.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    wrt = tuple(range(len(arrays))) if wrt is None else tuple(wrt)

    leaves = [
        Tensor(to_device(a.copy(), device), requires_grad=i in wrt) for i, a in enumerate(arrays)
    ]
    out = f_tensor(*leaves)
    if not isinstance(out, Tensor) or out.size != 1:
        raise TypeError(f"check_gradients: f must return a scalar Tensor, got {out!r}")
    out.backward()

    def f_numpy(values):
        with no_grad():
            return to_numpy(f_tensor(*(Tensor(to_device(v, device)) for v in values)).data).item()

    analytic = []
    for i in wrt:
        grad = leaves[i].grad
        assert grad is not None, f"input {i} (shape {arrays[i].shape}) received no gradient"
        grad = to_numpy(grad)
        assert grad.shape == arrays[i].shape, (
            f"input {i}: gradient shape {grad.shape} != input shape {arrays[i].shape}"
        )
        expected = numerical_gradient(f_numpy, arrays, i, eps=eps)
        np.testing.assert_allclose(
            grad, expected, rtol=rtol, atol=atol,
            err_msg=f"gradient of input {i} (shape {arrays[i].shape}) != central differences",
        )
        analytic.append(grad)
    return analytic
