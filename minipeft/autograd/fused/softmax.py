"""Fused softmax, log-softmax and cross-entropy, each with a composite ``*_ref`` twin.

The fused versions compute forward and backward in closed form instead of
through a chain of primitives, which saves both time and the intermediate
buffers the chain would keep for backward. Their twins, built only from
primitives, are the executable definition; tests check the two agree.
"""
from __future__ import annotations

import math

from ...backend import check_index_range, get_array_module
from .. import ops
from ..function import Function
from ..tensor import Tensor

IGNORE_INDEX = -100  # the label value that contributes nothing, as in PyTorch / HF


class Softmax(Function):
    # y = e^x / Σ e^x;  dx = y ⊙ (g − Σ g⊙y)
    def forward(self, x, axis=-1):
        xp = get_array_module(x)
        y = xp.exp(x - x.max(axis=axis, keepdims=True))
        y /= y.sum(axis=axis, keepdims=True)
        self.save(y, axis)
        return y

    def backward(self, g):
        y, axis = self.saved
        return y * (g - (g * y).sum(axis=axis, keepdims=True))


class LogSoftmax(Function):
    # y = x − log Σ e^x;  dx = g − e^y · Σ g
    def forward(self, x, axis=-1):
        xp = get_array_module(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.save(y, axis)
        return y

    def backward(self, g):
        y, axis = self.saved
        xp = get_array_module(g)
        return g - xp.exp(y) * g.sum(axis=axis, keepdims=True)


class CrossEntropy(Function):
    """Mean over non-ignored rows of −log softmax(x)[label].

    loss = (1/n) Σ_{i: yᵢ ≠ ignore} (logsumexp(xᵢ) − xᵢ[yᵢ]);
    dx_i = (softmax(xᵢ) − onehot(yᵢ)) · g / n for kept rows, 0 for ignored ones.

    Memory: rows are processed in chunks, so the forward keeps only the
    per-row log-sum-exp, and the backward allocates exactly one logits-sized
    buffer (the gradient itself). With no kept row the loss is NaN (0/0), as in
    PyTorch, and the gradient is zero.
    """

    CHUNK_ELEMENTS = 1 << 22  # ~16 MB of float32 temporaries per chunk

    def forward(self, logits, labels, ignore_index=IGNORE_INDEX):
        xp = get_array_module(logits)
        vocab = logits.shape[-1]
        x = logits.reshape(-1, vocab)
        kept, safe_y = checked_labels(labels, x.shape[0], vocab, ignore_index, "cross_entropy", "rows of logits")
        lse = xp.empty(x.shape[0], dtype=x.dtype)
        for rows in row_chunks(x.shape[0], vocab, self.CHUNK_ELEMENTS):
            block = x[rows]
            peak = block.max(axis=1)
            lse[rows] = peak + xp.log(xp.exp(block - peak[:, None]).sum(axis=1))
        loss, count = mean_over_kept(lse - x[xp.arange(x.shape[0]), safe_y], kept)
        self.save(logits, safe_y, kept, lse, count)
        return loss

    def backward(self, g):
        logits, safe_y, kept, lse, count = self.saved
        xp = get_array_module(logits)
        vocab = logits.shape[-1]
        x = logits.reshape(-1, vocab)
        grad = xp.empty_like(x)  # the one logits-sized buffer
        if count == 0:
            grad[...] = 0
            return grad.reshape(logits.shape), None
        scale = float(g) / count
        row_scale = kept * x.dtype.type(scale)  # g/n for kept rows, 0 for ignored ones
        # Probabilities that would end up subnormal (|p·scale| < 1.2e-38 in float32) are
        # flushed to zero: they change nothing measurable, but BLAS runs ~25x slower on
        # subnormal inputs in the next matmul (trained models produce plenty of them).
        flush_below = xp.finfo(x.dtype).tiny / abs(scale) if scale else float("inf")
        for rows in row_chunks(x.shape[0], vocab, self.CHUNK_ELEMENTS):
            block = grad[rows]
            xp.subtract(x[rows], lse[rows, None], out=block)
            xp.exp(block, out=block)  # softmax
            block *= block >= flush_below
            block[xp.arange(block.shape[0]), safe_y[rows]] -= 1  # − onehot(y)
            block *= row_scale[rows, None]
        return grad.reshape(logits.shape), None



def row_chunks(rows: int, vocab: int, chunk_elements: int) -> list[slice]:
    """Slices of ``rows`` in chunks of equal size, each at most ``chunk_elements`` logits."""
    most = max(1, chunk_elements // max(vocab, 1))
    count = max(1, math.ceil(rows / most))
    step = max(1, math.ceil(rows / count))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def mean_over_kept(per_row, kept):
    """(mean of ``per_row`` over the kept rows, how many were kept); NaN when none was (0/0,
    as in PyTorch)."""
    xp = get_array_module(per_row)
    count = int(kept.sum())
    loss = (per_row * kept).sum() / count if count else xp.asarray(float("nan"), dtype=per_row.dtype)
    return xp.asarray(loss, dtype=per_row.dtype), count


def checked_labels(labels, rows: int, vocab: int, ignore_index: int, op: str, what: str):
    """(kept, safe): a mask of the labels that count, and the labels with ignored ones set to
    0 (a valid index); raises on a row-count mismatch or a label outside [0, vocab)."""
    xp = get_array_module(labels)
    y = labels.reshape(-1)
    if y.shape[0] != rows:
        raise ValueError(f"{op}: {rows} {what} but {y.shape[0]} labels")
    kept = y != ignore_index
    check_index_range(y[kept], vocab, "cross_entropy labels")
    return kept, xp.where(kept, y, 0)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)


def cross_entropy(logits, labels, ignore_index=IGNORE_INDEX):
    """Mean token cross-entropy; rows whose label is ``ignore_index`` are skipped."""
    return CrossEntropy.apply(logits, labels, ignore_index=ignore_index)


# ----- composite twins ---------------------------------------------------------------
def softmax_ref(x, axis=-1):
    """e^(x − max) / Σ e^(x − max), from primitives (max is a constant shift)."""
    shifted = x - ops.max(x, axis=axis, keepdims=True).detach()
    e = ops.exp(shifted)
    return e / ops.sum(e, axis=axis, keepdims=True)


def log_softmax_ref(x, axis=-1):
    """x − max − log Σ e^(x − max), from primitives."""
    shifted = x - ops.max(x, axis=axis, keepdims=True).detach()
    return shifted - ops.log(ops.sum(ops.exp(shifted), axis=axis, keepdims=True))


def cross_entropy_ref(logits, labels, ignore_index=IGNORE_INDEX):
    """−(1/n) Σ kept log_softmax(x)[y], from primitives."""
    xp = get_array_module(logits.data)
    vocab = logits.shape[-1]
    logp = log_softmax_ref(ops.reshape(logits, (-1, vocab)))
    y = (labels.data if isinstance(labels, Tensor) else xp.asarray(labels)).reshape(-1)
    kept = y != ignore_index
    picked = logp[(xp.arange(y.shape[0]), xp.where(kept, y, 0))]
    return -ops.sum(picked * kept.astype(logits.dtype)) / int(kept.sum())
