"""Primitive ops: one class each, forward next to backward, derivative in a comment.

Gradients of broadcast operands are returned at the broadcast shape; the engine
sums them back (see ``unbroadcast``). Lower-case functions at the bottom are the
public spelling (``ops.add(a, b)`` or ``a + b``). Composite ops (``mean``,
``sqrt``, ``softmax_ref`` ...) are built from these and need no backward.
"""
from __future__ import annotations

from ..backend import get_array_module, scatter_add
from .function import Function
from .tensor import Tensor, is_grad_enabled


# ----- elementwise -------------------------------------------------------------------
class Add(Function):
    # d(a+b)/da = 1, d(a+b)/db = 1
    def forward(self, a, b):
        return a + b

    def backward(self, g):
        return g, g


class Sub(Function):
    # d(a-b)/da = 1, d(a-b)/db = -1
    def forward(self, a, b):
        return a - b

    def backward(self, g):
        return g, (-g if self.needs_input_grad[1] else None)


class Mul(Function):
    # d(ab)/da = b, d(ab)/db = a
    def forward(self, a, b):
        self.save(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        return (g * b if self.needs_input_grad[0] else None,
                g * a if self.needs_input_grad[1] else None)


class Div(Function):
    # d(a/b)/da = 1/b, d(a/b)/db = -a/b²
    def forward(self, a, b):
        self.save(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        return (g / b if self.needs_input_grad[0] else None,
                -g * a / (b * b) if self.needs_input_grad[1] else None)


class Neg(Function):
    # d(-a)/da = -1
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


class Pow(Function):
    # d(a^p)/da = p a^(p-1), for a constant exponent p
    def forward(self, a, exponent):
        self.save(a, exponent)
        return a**exponent

    def backward(self, g):
        a, p = self.saved
        return g * p * a ** (p - 1)


class Exp(Function):
    # d(e^a)/da = e^a
    def forward(self, a):
        out = get_array_module(a).exp(a)
        self.save(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        return g * out


class Log(Function):
    # d(log a)/da = 1/a
    def forward(self, a):
        self.save(a)
        return get_array_module(a).log(a)

    def backward(self, g):
        (a,) = self.saved
        return g / a


class Tanh(Function):
    # d(tanh a)/da = 1 - tanh(a)²
    def forward(self, a):
        out = get_array_module(a).tanh(a)
        self.save(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        return g * (1 - out * out)


class Sigmoid(Function):
    # d(σ(a))/da = σ(a)(1 - σ(a))
    def forward(self, a):
        xp = get_array_module(a)
        out = 1 / (1 + xp.exp(-a))
        self.save(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        return g * out * (1 - out)


class Relu(Function):
    # d(max(a,0))/da = [a > 0]
    def forward(self, a):
        self.save(a > 0)
        return a * (a > 0)

    def backward(self, g):
        (positive,) = self.saved
        return g * positive


class Where(Function):
    # d(where(c, a, b))/da = [c], /db = [not c]; c is a constant boolean array
    def forward(self, a, b, condition):
        self.save(condition)
        return get_array_module(a).where(condition, a, b)

    def backward(self, g):
        (c,) = self.saved
        xp = get_array_module(g)
        return (xp.where(c, g, 0) if self.needs_input_grad[0] else None,
                xp.where(c, 0, g) if self.needs_input_grad[1] else None)


# ----- linear algebra ----------------------------------------------------------------
class MatMul(Function):
    # d(a@b)/da = g @ bᵀ, d(a@b)/db = aᵀ @ g (over the last two axes; batch axes broadcast)
    def forward(self, a, b):
        self.save(a, b)
        return a @ b

    def backward(self, g):
        a, b = self.saved
        xp = get_array_module(g)
        # A 1-D operand is a row (a) or column (b) whose axis the product dropped:
        # put that axis back so the formulas apply, then drop it from the gradient.
        if b.ndim == 1:
            g, b = g[..., None], b[:, None]
        if a.ndim == 1:
            g, a = g[..., None, :], a[None, :]
        da = g @ xp.swapaxes(b, -1, -2) if self.needs_input_grad[0] else None
        db = xp.swapaxes(a, -1, -2) @ g if self.needs_input_grad[1] else None
        if da is not None and self.saved[0].ndim == 1:
            da = da[..., 0, :]
        if db is not None and self.saved[1].ndim == 1:
            db = db[..., 0]
        return da, db


# ----- reductions --------------------------------------------------------------------
class Sum(Function):
    # d(Σ a)/da = 1, broadcast back over the summed axes
    def forward(self, a, axis=None, keepdims=False):
        self.save(a.shape, axis, keepdims)
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(self, g):
        shape, axis, keepdims = self.saved
        xp = get_array_module(g)
        if not keepdims and axis is not None:
            g = xp.expand_dims(g, _positive_axes(axis, len(shape)))
        return xp.broadcast_to(g, shape)


class Max(Function):
    # d(max a)/da = 1 at the maximum (shared equally between ties), 0 elsewhere
    def forward(self, a, axis=None, keepdims=False):
        out = a.max(axis=axis, keepdims=True)
        self.save(a, out, axis, keepdims)
        return out if keepdims else out.squeeze(axis=axis)

    def backward(self, g):
        a, out, axis, keepdims = self.saved
        xp = get_array_module(g)
        if not keepdims and axis is not None:
            g = xp.expand_dims(g, _positive_axes(axis, a.ndim))
        winners = (a == out).astype(a.dtype)
        return g * winners / winners.sum(axis=axis, keepdims=True)


# ----- shape ------------------------------------------------------------------------
class Reshape(Function):
    # reshape moves no values: the gradient is reshaped back
    def forward(self, a, shape):
        self.save(a.shape)
        return a.reshape(shape)

    def backward(self, g):
        (shape,) = self.saved
        return g.reshape(shape)


class Transpose(Function):
    # a permutation of axes: the gradient takes the inverse permutation
    def forward(self, a, axes=None):
        axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(axes)
        self.save(axes)
        return a.transpose(axes)

    def backward(self, g):
        (axes,) = self.saved
        inverse = [0] * len(axes)
        for i, ax in enumerate(axes):
            inverse[ax] = i
        return g.transpose(inverse)


class GetItem(Function):
    # indexing picks values: the gradient scatters back (adding where an index repeats)
    def forward(self, a, index):
        self.save(a.shape, a.dtype, index)
        return a[index]

    def backward(self, g):
        shape, dtype, index = self.saved
        xp = get_array_module(g)
        out = xp.zeros(shape, dtype=dtype)
        if _is_basic_index(index):
            out[index] = g  # slices never repeat an element: plain assignment is exact
        else:
            scatter_add(out, index, g)
        return out


class Concat(Function):
    # concatenation: each input's gradient is its slice of g
    def forward(self, *arrays, axis=0):
        xp = get_array_module(*arrays)
        self.save(axis, [x.shape[axis] for x in arrays])
        return xp.concatenate(arrays, axis=axis)

    def backward(self, g):
        axis, sizes = self.saved
        xp = get_array_module(g)
        bounds, total = [], 0  # running offsets (the builtin sum is shadowed here by ops.sum)
        for n in sizes[:-1]:
            total += n
            bounds.append(total)
        return tuple(xp.split(g, bounds, axis=axis))


class Cast(Function):
    # a dtype change: the gradient is cast back
    def forward(self, a, dtype):
        self.save(a.dtype)
        return a.astype(dtype)

    def backward(self, g):
        (dtype,) = self.saved
        return g.astype(dtype)


def _is_basic_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


def _positive_axes(axis, ndim):
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(ax % ndim for ax in axes))


# ----- public spelling ---------------------------------------------------------------
def add(a, b):
    return Add.apply(a, b)


def sub(a, b):
    return Sub.apply(a, b)


def mul(a, b):
    return Mul.apply(a, b)


def div(a, b):
    return Div.apply(a, b)


def neg(a):
    return Neg.apply(a)


def pow(a, exponent):  # noqa: A001 - mirrors the operator
    return Pow.apply(a, exponent=exponent)


def exp(a):
    return Exp.apply(a)


def log(a):
    return Log.apply(a)


def tanh(a):
    return Tanh.apply(a)


def sigmoid(a):
    return Sigmoid.apply(a)


def relu(a):
    return Relu.apply(a)


def where(condition, a, b):
    """``a`` where the constant boolean ``condition`` holds, else ``b``."""
    cond = condition.data if isinstance(condition, Tensor) else condition
    return Where.apply(a, b, condition=cond)


def matmul(a, b):
    return MatMul.apply(a, b)


def sum(a, axis=None, keepdims=False):  # noqa: A001 - mirrors NumPy
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def max(a, axis=None, keepdims=False):  # noqa: A001 - mirrors NumPy
    return Max.apply(a, axis=axis, keepdims=keepdims)


def reshape(a, shape):
    shape = tuple(shape) if not isinstance(shape, int) else (shape,)
    if _nothing_to_record(a):  # a view, and no gradient to route: the op itself is not needed
        return Tensor.of_array(a.data.reshape(shape))
    return Reshape.apply(a, shape=shape)


def transpose(a, axes=None):
    if _nothing_to_record(a):
        return Tensor.of_array(a.data.transpose(axes))
    return Transpose.apply(a, axes=axes)


def _nothing_to_record(a) -> bool:
    """Whether a view of ``a`` needs no node in the graph (decoding reshapes and transposes
    each layer's q, k, v and attention output: 8 ops of ~700 a token, dispatch not free)."""
    return isinstance(a, Tensor) and not (a.requires_grad and is_grad_enabled())


def getitem(a, index):
    if isinstance(index, Tensor):
        index = index.data
    return GetItem.apply(a, index=index)


def concat(tensors, axis=0):
    return Concat.apply(*tensors, axis=axis)


def cast(a, dtype):
    return Cast.apply(a, dtype=dtype)


# ----- composites (no backward of their own) -----------------------------------------
def mean(a, axis=None, keepdims=False):
    """Σ a / n over ``axis``."""
    shape = a.shape if isinstance(a, Tensor) else get_array_module(a).shape(a)
    axes = range(len(shape)) if axis is None else _positive_axes(axis, len(shape))
    count = 1
    for ax in axes:
        count *= shape[ax]
    return sum(a, axis=axis, keepdims=keepdims) / count


def sqrt(a):
    return pow(a, 0.5)


def silu(a):
    """x·σ(x)."""
    return a * sigmoid(a)


def swapaxes(a, axis1, axis2):
    axes = list(range(a.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(a, axes)


def dropout(a, p: float, rng, training: bool = True):
    """Inverted dropout: zero each value with probability p, scale the rest by 1/(1-p).

    The mask is drawn on the host from ``rng`` (a ``numpy.random.Generator``) so
    the same seed gives the same mask on every backend.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p={p} must lie in [0, 1]")
    if not training or p == 0.0:
        return a
    if p == 1.0:  # everything dropped; keep / (1 - p) would be 0/0 = NaN
        return a * 0.0
    from ..backend import to_device  # noqa: PLC0415

    keep = rng.random(a.shape) >= p
    mask = to_device((keep / (1.0 - p)).astype(a.dtype), a.device)
    return a * mask
