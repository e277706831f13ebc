"""The output head and the loss in one op: cross-entropy of ``h Wᵀ`` without the logits.

    z = h Wᵀ                       h: (N, D) hidden states, W: (V, D) the LM head
    loss = (1/n) Σ_{i kept} (logsumexp(zᵢ) − zᵢ[yᵢ])         n = number of kept rows
    dh = (g/n) (P − Y) W            dW = (g/n) (P − Y)ᵀ h

with P = softmax(z) row by row and Y the one-hot labels. Rows whose label is ignored are
left out before any product (their dh is zero): each sequence's last position, padding,
and the prompt tokens that supervised fine-tuning masks cost nothing. (P − Y does not
depend on g, the gradient arriving at the loss, so it can be formed before backward is
called.)

Why fuse: the vocabulary-wide logits are the largest arrays of a training step (batch
8 × 256 tokens × 32,000 words is 262 MB in float32), and the unfused chain ``lm_head``
then ``cross_entropy`` holds two of them (the logits until backward, then their
gradient). Here the rows go in chunks: each chunk's logits are computed, turned into
P − Y in place, and multiplied back into dh (and dW) at once, so one chunk of logits is
all that ever exists and backward is a multiplication by g/n. The idea is Liger-Kernel's
fused linear cross-entropy (Hsu et al., 2024, arXiv:2410.10989) and Cut Cross-Entropy
(Wijmans et al., 2024, arXiv:2411.09009).

The price: the gradient products run in forward, so the op does them only when autograd
records (a training step); without gradients it computes the loss alone. The logits are
not returned; ``linear_cross_entropy_ref`` (``linear`` then ``cross_entropy``) is the
composite twin the tests compare with.
"""
from __future__ import annotations

from ...backend import get_array_module
from ..function import Function
from .layers import linear_ref
from .softmax import IGNORE_INDEX, checked_labels, cross_entropy_ref, mean_over_kept, row_chunks


class LinearCrossEntropy(Function):
    CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB of float32 (524 rows of a 32K vocabulary)

    def forward(self, h, weight, labels, ignore_index=IGNORE_INDEX):
        xp = get_array_module(h)
        vocab, width = weight.shape
        x = h.reshape(-1, width)
        kept, safe_y = checked_labels(labels, x.shape[0], vocab, ignore_index, "linear_cross_entropy",
                                      "rows of hidden states")
        # Rows with an ignored label (each sequence's last position, padding, a prompt that
        # supervised fine-tuning masks out) contribute nothing: only the kept rows are multiplied.
        used = None if bool(kept.all()) else xp.flatnonzero(kept)
        if used is not None:
            x, safe_y = x[used], safe_y[used]
        want_dh, want_dw = self.needs_input_grad[0], self.needs_input_grad[1]
        dh = xp.empty_like(x) if want_dh else None
        dw = xp.zeros_like(weight) if want_dw else None
        lse = xp.empty(x.shape[0], dtype=x.dtype)
        picked = xp.empty(x.shape[0], dtype=x.dtype)
        chunks = row_chunks(x.shape[0], vocab, self.CHUNK_ELEMENTS)
        buffer = xp.empty((chunks[0].stop if chunks else 0, vocab), dtype=x.dtype)  # reused by every chunk
        # Probabilities below the smallest normal float are flushed to zero: they change
        # nothing measurable, but BLAS runs far slower on subnormal inputs (see CrossEntropy).
        tiny = xp.finfo(x.dtype).tiny
        for rows in chunks:
            z = buffer[: rows.stop - rows.start]
            xp.matmul(x[rows], weight.T, out=z)  # this chunk's logits
            at_label = (xp.arange(z.shape[0]), safe_y[rows])
            picked[rows] = z[at_label]
            peak = z.max(axis=1, keepdims=True)
            z -= peak
            xp.exp(z, out=z)
            total = z.sum(axis=1, keepdims=True)
            lse[rows] = (peak + xp.log(total))[:, 0]
            if not (want_dh or want_dw):
                continue
            z *= 1 / total  # P
            xp.copyto(z, 0, where=z < tiny)
            z[at_label] -= 1  # P − Y
            if want_dh:
                xp.matmul(z, weight, out=dh[rows])
            if want_dw:
                dw += z.T @ x[rows]
        loss, count = mean_over_kept(lse - picked, kept if used is None else kept[used])
        if dh is not None and used is not None:  # ignored rows: zero gradient
            dh, dh_used = xp.zeros((kept.shape[0], width), dtype=dh.dtype), dh
            dh[used] = dh_used
        self.save(dh, dw, count, h.shape)
        return loss

    def backward(self, g):
        dh, dw, count, shape = self.saved
        scale = float(g) / count if count else 0.0
        if dh is not None:
            dh = (dh * dh.dtype.type(scale)).reshape(shape)
        if dw is not None:
            dw *= dw.dtype.type(scale)
        return dh, dw, None


def linear_cross_entropy(h, weight, labels, ignore_index=IGNORE_INDEX):
    """Mean token cross-entropy of the logits ``h Wᵀ`` (labels ``ignore_index`` skipped),
    computed without ever holding all of them: the training loss of a language model."""
    return LinearCrossEntropy.apply(h, weight, labels, ignore_index=ignore_index)


def linear_cross_entropy_ref(h, weight, labels, ignore_index=IGNORE_INDEX):
    """The composite twin, from primitives: the logits, then the cross-entropy."""
    return cross_entropy_ref(linear_ref(h, weight), labels, ignore_index=ignore_index)
