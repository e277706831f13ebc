"""A small reverse-mode autograd engine over NumPy / CuPy arrays.

``Tensor`` holds data and (for leaves) ``.grad``; ``Function`` subclasses in
``ops`` (primitives) and ``fused`` (fused ops with composite twins) define the
math; ``no_grad`` turns recording off.
"""
from . import fused, ops
from .function import Function, unbroadcast
from .tensor import Tensor, as_tensor, is_grad_enabled, no_grad

__all__ = ["Function", "Tensor", "as_tensor", "fused", "is_grad_enabled", "no_grad", "ops", "unbroadcast"]
