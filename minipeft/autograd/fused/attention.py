"""Fused rotary embedding (RoPE) and causal grouped-query attention, with twins.

Shapes: queries (B, H, T, Dh), keys and values (B, Hkv, S, Dh) with H = G·Hkv
(grouped-query attention: query head h reads key/value head h // G, as
transformers' ``repeat_kv`` does). The T queries are the *last* T of the S
positions, so the same op serves training (T = S) and cached decoding (T < S).
"""
from __future__ import annotations

import functools
import math

from ...backend import get_array_module
from .. import ops
from ..function import Function
from ..tensor import Tensor
from .softmax import softmax_ref


class Rope(Function):
    """y = x⊙cos + rotate_half(x)⊙sin, rotate_half(x₁, x₂) = (−x₂, x₁) (HF's convention).

    rotate_half is a product with a signed permutation, rotate_half(x) = x R, and Rᵀ = −R,
    so dx = g⊙cos + (g⊙sin) Rᵀ = g⊙cos − rotate_half(g⊙sin). Two ways to compute it:

    * as that product, for head_dim up to ``PRODUCT_MAX_DH``: one BLAS call and whole-row
      elementwise passes. Splitting x into halves instead runs NumPy loops whose inner
      dimension is Dh/2 (4 for a head_dim of 8), which are mostly loop overhead;
    * by halves, for larger head_dim, where x R would cost Dh multiply-adds per element:
      with S = (−sin₁, sin₂) and swap(x₁, x₂) = (x₂, x₁) (a view: the halves axis reversed),
      y = x⊙cos + swap(x)⊙S and dx = g⊙cos + swap(g)⊙swap(S), each two whole-array passes
      and one at half-width inner loops.

    Both give the same numbers (R's entries are 0 and ±1, S's signs are exact). The product
    path returns a C-contiguous (B, H, T, Dh) array; the halves path keeps the memory layout
    of x — the model passes a (B, H, T, Dh) view of its (B, T, H, Dh) projection, and reading
    and writing that memory in order, not through the transposed view, is what makes it fast
    (one core, SmolLM2's B4 H9 T128 Dh64 query, cache cold: 0.79 → 0.45 ms) — and dx gets that
    layout too, so the projection's gradient is a reshape, not a copy. In a SmolLM2-135M LoRA
    step (``minipeft profile``, 4 × 128, one core) RoPE went 45.8 → 40.6 ms and the Reshape
    backward 3.0 → 0.9 ms: 0.2% of the step.
    """

    # One core, one call with attention's q·scale after it, ms (product / halves as they were before
    # they kept x's layout, which is faster still at head_dim 64, above): head_dim 8
    # (B8 T256 H8) 0.25 / 0.82; 32 (B4 T128 H9) 0.22 / 0.35; 48 (B8 T256 H6) 0.88 / 1.00;
    # 64 (B4 T128 H9) 0.52 / 0.47.
    PRODUCT_MAX_DH = 48

    def forward(self, x, cos, sin):
        xp = get_array_module(x)
        dh = x.shape[-1]
        if dh <= self.PRODUCT_MAX_DH:
            self.save(cos, sin, None)
            out = xp.empty(x.shape, x.dtype)
            xp.multiply(x, cos, out=out)
            rotated = x @ rotate_half_matrix(dh, x.dtype, xp)
            rotated *= sin
            out += rotated
            return out
        if x.strides[-1] != x.itemsize:  # the halves below are views of a contiguous last axis
            x = xp.ascontiguousarray(x)
        signed_sin = sin * half_signs(dh, sin.dtype, xp)  # S = (−sin₁, sin₂)
        if any(self.needs_input_grad):
            self.save(cos, signed_sin, memory_order(x))
        return rotate_by_halves(x, cos, signed_sin, xp.empty_like(x), xp)

    def backward(self, g):
        cos, sin, order = self.saved
        xp = get_array_module(g)
        dh = g.shape[-1]
        if order is None:
            dx = xp.empty(g.shape, g.dtype)
            xp.multiply(g, cos, out=dx)
            dx += (g * sin) @ rotate_half_matrix(dh, g.dtype, xp).T
            return dx
        swapped_sin = _swapped(sin).reshape(sin.shape)  # swap(S), S saved by forward (small: no head axis)
        return rotate_by_halves(g, cos, swapped_sin, empty_in_order(g.shape, order, g.dtype, xp), xp)


def _swapped(x):
    """swap(x) = (x₂, x₁) as a (…, 2, Dh/2) view of x: its halves axis reversed."""
    return _as_halves(x)[..., ::-1, :]


def rotate_by_halves(x, cos, signed_sin, out, xp):
    """out = x⊙cos + swap(x)⊙S, in out's memory (a view of (…, Dh), any layout)."""
    xp.multiply(x, cos, out=out)
    term = xp.empty_like(out)
    xp.multiply(_swapped(x), _as_halves(signed_sin), out=_as_halves(term))
    out += term
    return out


def _as_halves(x):
    return x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)


def memory_order(x):
    """x's axes from the outermost in memory to the innermost (largest stride first)."""
    return tuple(sorted(range(x.ndim), key=lambda axis: -x.strides[axis]))


def empty_in_order(shape, order, dtype, xp):
    """An uninitialised array of ``shape`` whose memory runs in ``order`` (see memory_order)."""
    buffer = xp.empty(tuple(shape[axis] for axis in order), dtype)
    return buffer.transpose(tuple(order.index(axis) for axis in range(len(shape))))


@functools.lru_cache(maxsize=8)
def half_signs(dh, dtype, xp):
    """(−1, …, −1, 1, …, 1): Dh/2 of each; sin times it is S."""
    return xp.concatenate((-xp.ones(dh // 2, dtype), xp.ones(dh - dh // 2, dtype)))


@functools.lru_cache(maxsize=8)
def rotate_half_matrix(dh, dtype, xp):
    """R with x R = rotate_half(x) = (−x₂, x₁): −1 from x₂ to the first half, +1 from x₁ to the
    second. Made once per (head_dim, dtype, backend): every RoPE call of every layer reads it."""
    half = dh // 2
    rotation = xp.zeros((dh, dh), dtype)
    rotation[half:, :half] = -xp.eye(half, dtype=dtype)
    rotation[:half, half:] = xp.eye(half, dtype=dtype)
    return rotation


def attention_bias(query_len, key_len, key_padding_mask, dtype, xp):
    """Additive mask (B or 1, 1, T, S): 0 where query t may read key s, else dtype's min.

    Query t sits at position ``key_len − query_len + t`` and reads keys at or before
    it (causal) that are real tokens (``key_padding_mask`` True; None = all real).
    A finite minimum (not −inf) keeps the arithmetic free of NaN; a query that
    may read no key at all (a left-padding position) gets output 0.
    """
    offset = key_len - query_len
    allowed = xp.arange(key_len)[None, :] <= (xp.arange(query_len)[:, None] + offset)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.astype(bool)[:, None, None, :]
    return xp.where(allowed, 0, xp.finfo(dtype).min).astype(dtype)


class Attention(Function):
    """softmax(q kᵀ / √Dh + mask) v, batched over batch and heads.

    Query heads are grouped under their key/value head, so the scores of the G query
    heads that share one are a single matmul, with no copy of k or v per query head; the
    (batch, key/value head) pairs are one axis of B·Hkv matrices. q is scaled by 1/√Dh
    first (a T×Dh pass rather than a T×S one).

    Causal skipping: queries are taken in blocks of ``QUERY_BLOCK`` rows, and a
    block reads only the keys up to its last position — the keys after it are
    masked anyway. Each block's softmax runs over complete rows, so the result is
    exact; for T = S it does about half the work of the full T×S product. With the causal
    mask alone (no padding), only a block's last keys are masked; the earlier ones are
    read by every query of the block. Without gradients the (T, Dh) output is divided by
    the softmax sums instead of the (T, S) probabilities: one pass over the scores fewer.

    Backward (P = probabilities, O = output, dO = g), as in FlashAttention:
      dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P ⊙ (dP − rowsum(dO ⊙ O)) / √Dh;  dQ = dS K;  dK = dSᵀ Q
    using rowsum(dP ⊙ P) = rowsum(dO ⊙ O), which avoids a second (T, S) temporary.
    """

    # Forward + backward, one core, interleaved medians of 25 (block 32 / 64 / 128): SmolLM2-135M's
    # B4 H9/3 T128 Dh64 9.8 / 11.3 / 12.4 ms; stories15M's B8 H6 T256 Dh48 29.7 / 32.2 / 35.8 ms;
    # the bundled B8 H8 T256 Dh8 13.8 / 13.9 / 16.0 ms. Smaller blocks skip more masked keys.
    # Then keys as a contiguous (Dh, S) copy and the pairs on one axis (v, k reshaped once, not
    # sliced as strided views per block), same setting, medians of 30 with the trainer's allocator:
    # 5.06 → 4.82 ms, 29.1 → 22.5 ms, 12.6 → 11.3 ms.
    QUERY_BLOCK = 32

    def forward(self, q, k, v, bias, causal_only=False):
        xp = get_array_module(q)
        batch, heads, tq, dh = q.shape
        kv_heads, tk = k.shape[1], k.shape[2]
        group, pairs = heads // kv_heads, batch * kv_heads
        scale = 1.0 / math.sqrt(dh)
        keep = any(self.needs_input_grad)  # backward needs the probabilities
        if tq == 1 and causal_only and not keep:
            return self.one_query(q, k, v, scale, xp)
        q4 = xp.empty(q.shape, q.dtype)  # C-contiguous whatever q's layout (RoPE keeps the model's)
        xp.multiply(q, scale, out=q4)
        q4 = q4.reshape(pairs, group, tq, dh)
        k_t = keys_last(k, tq).reshape(pairs, dh, tk)
        v3 = v.reshape(pairs, tk, dh)
        out = xp.empty_like(q4)
        blocks = []
        for t0 in range(0, tq, self.QUERY_BLOCK):
            t1 = min(t0 + self.QUERY_BLOCK, tq)
            rows, keys = group * (t1 - t0), tk - tq + t1  # keys after position tk−tq+t1−1 are masked
            qb = q4[:, :, t0:t1].reshape(pairs, rows, dh)
            scores = qb @ k_t[:, :, :keys]  # (B·Hkv, G·bT, keys)
            # Causal mask alone (no padding): every query of the block reads the keys before
            # the block's first position, so only the last t1 − t0 keys need the mask.
            first = tk - tq + t0 if causal_only else 0
            per_head = scores.reshape(batch, kv_heads, group, t1 - t0, keys)
            per_head[..., first:] += bias[:, :, None, t0:t1, first:keys]
            row_max = scores.max(axis=-1, keepdims=True)
            scores -= row_max
            xp.exp(scores, out=scores)
            total = scores.sum(axis=-1, keepdims=True)
            if keep:
                scores /= total
            if not causal_only:  # padding: a row may read no key at all (its output is 0)
                dead = row_max <= xp.finfo(scores.dtype).min / 2
                if dead.any():
                    scores *= ~dead
            block = scores @ v3[:, :keys]  # (B·Hkv, G·bT, Dh)
            if not keep:  # normalize the (…, Dh) output rather than the (…, keys) probabilities
                block /= total
            out[:, :, t0:t1] = block.reshape(pairs, group, t1 - t0, dh)
            if keep:
                blocks.append((t0, t1, keys, qb, scores))
        if keep:
            self.save(blocks, k, v, out, scale)
        return out.reshape(batch, heads, tq, dh)

    @staticmethod
    def one_query(q, k, v, scale, xp):
        """Cached decoding's step: one query, at the last position, reads every key, so there is
        no mask to add and no block loop; the same products and passes as the blocked path, so the
        same numbers. SmolLM2's decoding call, one core: 25.6 → 19.8 µs (30 calls a token; greedy
        decoding of 64 tokens about 1% faster over 7 alternating process pairs, the same ids)."""
        batch, heads, _, dh = q.shape
        pairs, tk = batch * k.shape[1], k.shape[2]
        queries = xp.multiply(q.reshape(pairs, heads // k.shape[1], dh), scale)  # (B·Hkv, G, Dh)
        scores = queries @ keys_last(k, 1).reshape(pairs, dh, tk)
        scores -= scores.max(axis=-1, keepdims=True)
        xp.exp(scores, out=scores)
        out = scores @ v.reshape(pairs, tk, dh)
        out /= scores.sum(axis=-1, keepdims=True)
        return out.reshape(batch, heads, 1, dh)

    def backward(self, g):
        blocks, k, v, out, scale = self.saved
        xp = get_array_module(g)
        pairs, group, tq, dh = out.shape
        tk = k.shape[2]
        go = g.reshape(out.shape)
        delta = (go * out).sum(axis=-1, keepdims=True)  # rowsum(dO ⊙ O), (B·Hkv, G, T, 1)
        k3, v_t = k.reshape(pairs, tk, dh), keys_last(v, tq).reshape(pairs, dh, tk)
        dq = xp.empty_like(out)
        dk, dv = xp.zeros_like(k3), xp.zeros_like(k3)
        for t0, t1, keys, qb, probs in blocks:
            rows = group * (t1 - t0)
            gob = go[:, :, t0:t1].reshape(pairs, rows, dh)
            dv[:, :keys] += xp.swapaxes(probs, -1, -2) @ gob
            ds = gob @ v_t[:, :, :keys]  # dP, (B·Hkv, G·bT, keys)
            ds -= delta[:, :, t0:t1].reshape(pairs, rows, 1)
            ds *= probs
            dq[:, :, t0:t1] = (ds @ k3[:, :keys]).reshape(pairs, group, t1 - t0, dh)
            dk[:, :keys] += xp.swapaxes(ds, -1, -2) @ qb
        dq *= scale
        return dq.reshape(g.shape), dk.reshape(k.shape), dv.reshape(v.shape), None


def keys_last(k, query_len):
    """k (B, Hkv, S, Dh) as a (B, Hkv, Dh, S) array: the right operand of q kᵀ (and of dO vᵀ).

    BLAS multiplies by a transposed view too, but for the thin Dh of small models it ran
    far slower than on a contiguous copy (one core, q kᵀ for a query block of 32: head_dim
    8 1.6×, 48 2.0×, 64 1.4× the time), and the copy is one pass over k shared by every
    block. A single query (cached decoding) reads k once anyway: there the view is used.
    """
    xp = get_array_module(k)
    k_t = xp.swapaxes(k, -1, -2)
    return k_t if query_len == 1 else xp.ascontiguousarray(k_t)


def rope(x, cos, sin):
    """Rotary position embedding; ``cos``/``sin`` broadcast against x (…, T, Dh)."""
    return Rope.apply(x, cos, sin)


def attention(q, k, v, key_padding_mask=None):
    """Causal grouped-query attention; ``key_padding_mask`` (B, S) marks real tokens."""
    xp = get_array_module(q.data)
    mask = key_padding_mask.data if isinstance(key_padding_mask, Tensor) else key_padding_mask
    if mask is None:
        bias = causal_bias(q.shape[2], k.shape[2], q.dtype, xp)
    else:
        bias = attention_bias(q.shape[2], k.shape[2], mask, q.dtype, xp)
    return Attention.apply(q, k, v, bias, causal_only=mask is None)


@functools.lru_cache(maxsize=2)
def causal_bias(query_len, key_len, dtype, xp):
    """The causal mask alone, made once per (T, S, dtype, backend): every layer of a forward
    reads the same one instead of each remaking it (with the model's padding-free path, SmolLM2
    greedy decoding 0.988× the time: one process, 8 alternating pairs of 64 tokens). Read-only
    where the backend allows: nothing may write into a shared mask."""
    bias = attention_bias(query_len, key_len, None, dtype, xp)
    if hasattr(bias, "flags") and hasattr(bias.flags, "writeable"):
        bias.flags.writeable = False
    return bias


# ----- composite twins ---------------------------------------------------------------
def rope_ref(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = ops.concat([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_ref(q, k, v, key_padding_mask=None):
    """The textbook version: repeat each key/value head for its G query heads."""
    xp = get_array_module(q.data)
    heads, kv_heads = q.shape[1], k.shape[1]
    which_kv = xp.arange(heads) // (heads // kv_heads)
    k_rep, v_rep = k[:, which_kv], v[:, which_kv]  # (B, H, S, Dh)
    mask = key_padding_mask.data if isinstance(key_padding_mask, Tensor) else key_padding_mask
    bias = attention_bias(q.shape[2], k.shape[2], mask, q.dtype, xp)
    scores = ops.matmul(q, ops.swapaxes(k_rep, -1, -2)) * (1.0 / math.sqrt(q.shape[-1])) + bias
    alive = (bias.max(axis=-1, keepdims=True) == 0).astype(q.dtype)  # rows with a readable key
    return ops.matmul(softmax_ref(scores) * alive, v_rep)
