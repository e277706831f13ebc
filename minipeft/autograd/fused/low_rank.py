"""A linear layer plus a low-rank update in one op: LoRA's forward, ΔW never formed.

    y = x Wᵀ + b + s (x Aᵀ) Bᵀ          W (out, in), A (r, in), B (out, r), s a number
    u = x Aᵀ (n, r);   v = s · g B (n, r)
    dx = g W + v A      dW = gᵀ x      db = Σ g      dA = vᵀ x      dB = s · gᵀ u

The composite (``linear`` twice, a scaling, an addition; ``low_rank_linear_ref``) is four
ops that each return a new array. Fused, the branch lands in the base output, dx's two
products share one buffer, and the engine has no gradients of x to add up: an adapted
layer allocates two activation-sized arrays fewer in a step and records one node
instead of four. The thin products (u, v, dA, dB) are the same in both.
"""
from __future__ import annotations

from ..function import Function
from .layers import linear_ref
from .thin_products import thin_matmul, times_transposed


class LowRankLinear(Function):
    def forward(self, x, weight, A, B, bias=None, scale=1.0):
        rows = x.reshape(-1, x.shape[-1])
        u = thin_matmul(rows, A.T)
        y = times_transposed(rows, weight)
        y += (u * scale) @ B.T
        if bias is not None:
            y += bias
        self.save(x, weight, A, B, u, scale)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, g):
        x, weight, A, B, u, scale = self.saved
        need = self.needs_input_grad
        rows = x.reshape(-1, x.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        v = thin_matmul(g2, B) * scale if (need[0] or need[2]) else None
        dx = None
        if need[0]:
            dx = g2 @ weight
            dx += thin_matmul(v, A)
            dx = dx.reshape(x.shape)
        dw = g2.T @ rows if need[1] else None
        da = thin_matmul(v.T, rows) if need[2] else None
        db_factor = thin_matmul(g2.T, u) * scale if need[3] else None
        if len(need) > 4:
            return dx, dw, da, db_factor, (g2.sum(axis=0) if need[4] else None)
        return dx, dw, da, db_factor


def low_rank_linear(x, weight, A, B, scale, bias=None):
    """x Wᵀ + b + s (x Aᵀ) Bᵀ: a Linear with a LoRA update, fused."""
    if bias is None:
        return LowRankLinear.apply(x, weight, A, B, scale=scale)
    return LowRankLinear.apply(x, weight, A, B, bias, scale=scale)


def low_rank_linear_ref(x, weight, A, B, scale, bias=None):
    """The composite twin: the base Linear plus the scaled two-matmul branch."""
    return linear_ref(x, weight, bias) + linear_ref(linear_ref(x, A) * scale, B)
