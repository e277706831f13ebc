"""Fused layer ops: linear, embedding lookup, RMSNorm and SiLU·up (SwiGLU).

Each has a composite ``*_ref`` twin made of primitives, and a test that the two
agree in value and gradient.
"""
from __future__ import annotations

from ...backend import check_index_range, get_array_module, scatter_add
from .. import ops
from ..function import Function
from ..tensor import Tensor
from .thin_products import times_transposed


class Linear(Function):
    # y = x Wᵀ + b;  dx = g W,  dW = gᵀ x,  db = Σ g   (W stored (out, in))
    # Flattening the leading axes turns everything into single 2-D BLAS calls, and
    # dW / db are skipped entirely when the weight / bias is frozen.
    def forward(self, x, weight, bias=None):
        self.save(x, weight)
        y = times_transposed(x.reshape(-1, x.shape[-1]), weight)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, g):
        x, weight = self.saved
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g2 @ weight).reshape(x.shape) if self.needs_input_grad[0] else None
        dw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) > 2:
            db = g2.sum(axis=0) if self.needs_input_grad[2] else None
            return dx, dw, db
        return dx, dw


class Embedding(Function):
    # y = W[ids];  dW = Σ over positions with id i of g  (scatter-add)
    def forward(self, weight, ids):
        check_index_range(ids, weight.shape[0], "embedding input_ids")
        self.save(weight.shape, ids)
        return weight[ids]

    def backward(self, g):
        shape, ids = self.saved
        xp = get_array_module(g)
        dw = xp.zeros(shape, dtype=g.dtype)
        scatter_add(dw, ids.reshape(-1), g.reshape(-1, shape[1]))
        return dw


class RMSNorm(Function):
    # y = w ⊙ x·r, r = (mean(x²) + ε)^(−1/2)
    # dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x);  dw = Σ g⊙x·r
    # The row means are dot products (einsum), not a squared copy then a mean; products land
    # in arrays made here. One core, forward + backward on (512, 1536): 4.5 → 3.2 ms.
    def forward(self, x, weight, eps=1e-6):
        xp = get_array_module(x)
        r = 1.0 / xp.sqrt(row_dots(x, x, xp) / x.shape[-1] + eps)
        self.save(x, weight, r)
        y = x * r
        y *= weight
        return y

    def backward(self, g):
        x, weight, r = self.saved
        xp = get_array_module(g)
        need_dx, need_dw = self.needs_input_grad[0], self.needs_input_grad[1]
        dw = None
        if need_dw:
            gxr = x * r
            gxr *= g
            dw = gxr.reshape(-1, x.shape[-1]).sum(axis=0)
        dx = None
        if need_dx:
            dx = g * weight
            coefficient = row_dots(dx, x, xp) * (r**3 / x.shape[-1])  # r³·mean(g⊙w⊙x)
            dx *= r
            dx -= x * coefficient
        return dx, dw


def row_dots(a, b, xp):
    """Σᵢ aᵢ bᵢ over the last axis, kept as a length-1 axis."""
    return xp.einsum("...i,...i->...", a, b)[..., None]


class SiluMul(Function):
    # h = silu(a) ⊙ u, silu(a) = a·σ(a);  dh/du = silu(a),  dh/da = u·σ(a)·(1 + a·(1 − σ(a)))
    # Computed in place in the arrays made here (one core, forward + backward on (512, 1536):
    # 3.0 → 2.75 ms).
    def forward(self, gate, up):
        xp = get_array_module(gate)
        sig = xp.negative(gate)
        xp.exp(sig, out=sig)
        sig += 1
        xp.reciprocal(sig, out=sig)  # σ(a) = 1 / (1 + e^(−a))
        self.save(gate, up, sig)
        h = gate * sig
        h *= up
        return h

    def backward(self, g):
        gate, up, sig = self.saved
        g_sig = g * sig
        d_up = g_sig * gate if self.needs_input_grad[1] else None  # g·silu(a)
        d_gate = None
        if self.needs_input_grad[0]:
            d_gate = 1 - sig
            d_gate *= gate
            d_gate += 1
            d_gate *= g_sig
            d_gate *= up
        return d_gate, d_up


def linear(x, weight, bias=None):
    """x Wᵀ + b with W of shape (out, in), as ``torch.nn.functional.linear``."""
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)


def embedding(weight, ids):
    """Rows ``weight[ids]``; ids out of range raise ``InputError`` on every backend."""
    if isinstance(ids, Tensor):
        ids = ids.data
    return Embedding.apply(weight, ids=ids)


def rms_norm(x, weight, eps=1e-6):
    return RMSNorm.apply(x, weight, eps=eps)


def silu_mul(gate, up):
    """silu(gate) ⊙ up: the gated unit of LLaMA's SwiGLU MLP."""
    return SiluMul.apply(gate, up)


# ----- composite twins ---------------------------------------------------------------
def linear_ref(x, weight, bias=None):
    y = ops.matmul(x, ops.transpose(weight))
    return y if bias is None else y + bias


def embedding_ref(weight, ids):
    return ops.getitem(weight, ids)


def rms_norm_ref(x, weight, eps=1e-6):
    variance = ops.mean(x * x, axis=-1, keepdims=True)
    return x * ops.pow(variance + eps, -0.5) * weight


def silu_mul_ref(gate, up):
    return ops.silu(gate) * up
