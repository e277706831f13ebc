"""`Tensor`: an array that remembers how it was made, and reverse-mode autodiff.

A Tensor wraps a NumPy or CuPy array (``.data``). When it was produced by a
:class:`~minipeft.autograd.function.Function` from inputs that need gradients,
it keeps that function (``._fn``), which points on to the functions that made its
inputs (``parents``; a leaf input is pointed to itself): together they form the
computation graph. ``loss.backward()`` walks that graph once in reverse
topological order, calling each function's ``backward`` and accumulating
gradients; only *leaf* tensors with ``requires_grad=True`` (the parameters)
store them in ``.grad``.

Gradients are not recorded inside ``with no_grad():`` — used for generation,
evaluation and in-place parameter updates.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from ..backend import device_of, get_array_module, to_device, to_numpy
from .function import unbroadcast

# The one module-level mutable state the house rules allow: is autograd recording? Per
# thread, as in PyTorch: generation under no_grad in one thread must not switch recording
# off for a training step running in another.
_grad_mode = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_grad_mode, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Run the block without recording the graph (no gradients, less memory). Applies to
    the calling thread only."""
    previous, _grad_mode.enabled = is_grad_enabled(), False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


class Tensor:
    """An n-dimensional array with optional gradient tracking."""

    __slots__ = ("data", "grad", "requires_grad", "_fn", "__weakref__")
    __array_priority__ = 1000  # so ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data.data
        xp = get_array_module(data)
        self.data = data if isinstance(data, xp.ndarray) else np.asarray(data)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._fn = None

    @classmethod
    def of_array(cls, data, requires_grad: bool = False) -> "Tensor":
        """Wrap an op's output: a NumPy array is taken as it is (the checks of ``Tensor(...)``
        cost as much as a small op does, and decoding runs ~700 ops a token)."""
        if type(data) is not np.ndarray:
            return cls(data, requires_grad)
        tensor = cls.__new__(cls)
        tensor.data, tensor.grad, tensor.requires_grad, tensor._fn = data, None, requires_grad, None
        return tensor

    # ----- array facts -------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    device = property(lambda self: device_of(self.data))

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{flag})"

    def numpy(self) -> np.ndarray:
        """The data as a host NumPy array."""
        return to_numpy(self.data)

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device: str) -> "Tensor":
        """A copy on ``device`` ('cpu' or 'cuda'), cut from the graph."""
        return Tensor(to_device(self.data, device), requires_grad=self.requires_grad)

    # ----- backward ----------------------------------------------------------------
    def backward(self, grad=None) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that needs it.

        ``grad`` defaults to 1 for a scalar. The graph is freed as it is walked
        (saved arrays are dropped), so call backward once per forward: a second
        backward through the same graph raises ``RuntimeError``.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        xp = get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError("backward() without a gradient needs a scalar output")
            grad = xp.ones_like(self.data)
        root = self if self._fn is None else self._fn
        grads = {id(root): grad.data if isinstance(grad, Tensor) else grad}
        stored = set()  # ids of the arrays owning the memory of the leaves' grads
        for node in _reverse_topological_order(root):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if isinstance(node, Tensor):  # a leaf: store the gradient
                if node.grad is not None:
                    node.grad = node.grad + g
                else:
                    # An op may pass one array to several inputs (Add does), or views of
                    # it (Reshape, Concat), or a broadcast view (Sum): give each leaf
                    # memory of its own, so an in-place update of one .grad cannot touch
                    # another (or, through a broadcast, the same cell several times).
                    if id(_owner(g)) in stored or _is_broadcast(g):
                        g = g.copy()
                    node.grad = g
                stored.add(id(_owner(node.grad)))
                continue
            if node.parents is None:
                raise RuntimeError(
                    "backward() through a graph a second time: its saved arrays were "
                    "freed by the first backward; run the forward again"
                )
            input_grads = node.backward(g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for parent, shape, ig in zip(node.parents, node.input_shapes, input_grads):
                if parent is None or ig is None:
                    continue
                ig = unbroadcast(ig, shape)
                key = id(parent)
                grads[key] = ig if key not in grads else grads[key] + ig
            # Free the graph behind us: saved activations are the bulk of memory.
            node.saved = ()
            node.parents = None  # marks it freed: a second backward through it raises

    # ----- operators (the ops live in ops.py; imported lazily to avoid a cycle) ----
    def __add__(self, other):
        return _ops().add(self, other)

    def __radd__(self, other):
        return _ops().add(other, self)

    def __sub__(self, other):
        return _ops().sub(self, other)

    def __rsub__(self, other):
        return _ops().sub(other, self)

    def __mul__(self, other):
        return _ops().mul(self, other)

    def __rmul__(self, other):
        return _ops().mul(other, self)

    def __truediv__(self, other):
        return _ops().div(self, other)

    def __rtruediv__(self, other):
        return _ops().div(other, self)

    def __neg__(self):
        return _ops().neg(self)

    def __pow__(self, exponent):
        return _ops().pow(self, exponent)

    def __matmul__(self, other):
        return _ops().matmul(self, other)

    def __rmatmul__(self, other):
        return _ops().matmul(other, self)

    def __getitem__(self, index):
        return _ops().getitem(self, index)

    def sum(self, axis=None, keepdims=False):
        return _ops().sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return _ops().mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False):
        return _ops().max(self, axis=axis, keepdims=keepdims)

    def exp(self):
        return _ops().exp(self)

    def log(self):
        return _ops().log(self)

    def sqrt(self):
        return _ops().sqrt(self)

    def reshape(self, *shape):
        return _ops().reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes):
        return _ops().transpose(self, axes[0] if len(axes) == 1 else (axes or None))

    @property
    def T(self):  # noqa: N802 - NumPy's name
        return _ops().transpose(self, None)


def _owner(array):
    """The array that owns the memory ``array`` views (itself if it is no view)."""
    return array if array.base is None else array.base


def _is_broadcast(array) -> bool:
    """True when several elements share one memory cell (a stride-0 broadcast view)."""
    return any(step == 0 and n > 1 for step, n in zip(array.strides, array.shape))


def _ops():
    return _ops_module


def _reverse_topological_order(root) -> list:
    """Nodes reachable from ``root`` (functions and leaf tensors), each after every node
    that uses it."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in () if isinstance(node, Tensor) else node.parents or ():  # leaves / freed: none
            if parent is not None and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()
    return order


def as_tensor(value) -> Tensor:
    """Return ``value`` if it is a Tensor, else a constant Tensor wrapping it."""
    return value if isinstance(value, Tensor) else Tensor(value)


# The operators above call ops.py, which imports this module: bind it once, at the end.
from . import ops as _ops_module  # noqa: E402
