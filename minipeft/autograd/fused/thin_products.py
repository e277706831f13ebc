"""Products with a thin side — few rows (decoding, a short prompt) or a low rank (LoRA) —
on the BLAS path that runs them fastest.

A thin product is memory-bound: every element of the large operand is read for a handful
of multiply-adds, and the general BLAS path first copies ("packs") the operands into its
blocking layout, one more pass over them than the product needs. On the CPU:

* ``times_transposed(rows, W)`` (rows Wᵀ, what Linear and the fused LoRA layer multiply by):
  up to ``VECDOT_ROWS`` rows, NumPy's own dot-product loop (``np.vecdot``, one dot per row
  of W) streams W about twice as fast as OpenBLAS's matrix-vector kernel for a row-major W
  (SmolLM2-135M's weights: 23 vs 12 GB/s on one core); up to ``WEIGHT_LEFT_ROWS`` rows
  without small kernels (below), (W xᵀ)ᵀ, W the left operand that OpenBLAS streams (1.1-1.3x
  at 22 rows; from 64 rows x Wᵀ is as fast or faster).
* ``thin_matmul(a, b)``: when NumPy's OpenBLAS has its AVX-512 small-matrix kernels (core
  types SkylakeX, Cooperlake, SapphireRapids; Zen 4 runs them), which multiply without
  packing, a float32 product whose short outer side and inner dimension are small goes in
  blocks along its long outer side that those kernels take (few-row x Wᵀ from 5 rows on, and
  LoRA's rank-r products); a large product finds no such block and runs as one. Their rule (OpenBLAS,
  kernel/x86_64/sgemm_small_kernel_permit_skylakex.c, in its column-major terms): M·N·K ≤ 10⁶;
  with A transposed also M·N ≤ 1200 and K ≥ 32; never both transposed. NumPy's row-major
  a @ b is b-then-a to column-major BLAS, so "A transposed" means ``b`` a transposed view.

Measured, one core: few-row x Wᵀ, 40 weights of 1536 × 576 read in turn as a forward reads a
model's, GFLOP/s ((W xᵀ)ᵀ → blocks): 8 rows 22.7 → 32.1, 22 rows 43.3 → 58.7, 32 rows
56.7 → 65.3, 64 rows 72.4 → 77.9; the LM head of SmolLM2 (49152 × 576) at 22 rows 40.2 → 58.8.
LoRA's rank-8 products of one SmolLM2 layer at 512 rows (x Aᵀ, g B, v A, vᵀ x, gᵀ u), µs:
857 → 451, 847 → 484, 705 → 504, 795 → 479, 911 → 469.
"""
from __future__ import annotations

import functools

import numpy as np

from ...backend import get_array_module

VECDOT_ROWS, WEIGHT_LEFT_ROWS = 4, 32
_HAS_VECDOT = hasattr(np, "vecdot")  # NumPy >= 2.0

# OpenBLAS's permit for its small-matrix sgemm kernels, and the block widths worth using
SMALL_KERNEL_MNK, SMALL_KERNEL_MN, SMALL_KERNEL_MIN_K = 10**6, 1200, 32
BLOCK_MULTIPLE = 16  # float32 lanes of an AVX-512 register
MIN_BLOCK_WORK = 10**5  # multiply-adds a block must hold to pay for one more BLAS call
AVX512_CORES = frozenset({"SkylakeX", "Cooperlake", "SapphireRapids"})


@functools.lru_cache(maxsize=1)
def has_small_sgemm_kernels() -> bool:
    """Whether the OpenBLAS NumPy loaded runs a core type with the small-matrix kernels."""
    from threadpoolctl import threadpool_info  # noqa: PLC0415 - a dependency, loaded when first needed

    return any(info.get("internal_api") == "openblas" and info.get("architecture") in AVX512_CORES
               for info in threadpool_info())


def small_kernel_block(short: int, inner: int, b_transposed: bool) -> int:
    """How long a block of a product's long outer side may be, given its short outer side and
    its inner dimension, for OpenBLAS's small-matrix kernel to take it: a multiple of 16, or 0
    when none fits (a large product: leave it to the packed path) or a block would hold too
    little work (bundled model's x Aᵀ, 2048 × 64 × 8: 15 calls of 144 rows, 58 → 71 µs)."""
    block = SMALL_KERNEL_MNK // (short * inner)
    if b_transposed:
        if inner < SMALL_KERNEL_MIN_K:
            return 0
        block = min(block, SMALL_KERNEL_MN // short)
    block -= block % BLOCK_MULTIPLE
    return block if block * short * inner >= MIN_BLOCK_WORK else 0


def thin_matmul(a, b):
    """a @ b for 2-D a (m, k) and b (k, n), in blocks along the longer of m and n when
    OpenBLAS's small-matrix kernels run such blocks (one product otherwise)."""
    block = small_kernel_blocks(a, b)
    return in_blocks(a, b, block) if block else a @ b


def small_kernel_blocks(a, b) -> int:
    """The block length of the long outer side that ``thin_matmul`` uses for a @ b, or 0
    when it runs as one product (not float32 on NumPy, no small kernels, both operands
    transposed, too large, or already small enough as a whole)."""
    if not (a.dtype == b.dtype == np.float32 and get_array_module(a) is np and has_small_sgemm_kernels()):
        return 0
    (m, inner), n = a.shape, b.shape[1]
    a_transposed, b_transposed = is_transposed(a), is_transposed(b)
    if a_transposed and b_transposed:
        return 0
    block = small_kernel_block(min(m, n), inner, b_transposed)
    return block if block < max(m, n) else 0


def in_blocks(a, b, block: int):
    """a @ b as products of ``block`` rows of a (a the taller) or columns of b, into one output."""
    (m, _), n = a.shape, b.shape[1]
    out = np.empty((m, n), dtype=np.result_type(a, b))
    if m >= n:
        for start in range(0, m, block):
            np.matmul(a[start:start + block], b, out=out[start:start + block])
    else:
        for start in range(0, n, block):
            np.matmul(a, b[:, start:start + block], out=out[:, start:start + block])
    return out


def is_transposed(matrix) -> bool:
    """Whether BLAS sees this 2-D array as a transposed (column-major) matrix."""
    return matrix.strides[0] == matrix.itemsize and matrix.strides[1] != matrix.itemsize


def times_transposed(rows, weight):
    """rows Wᵀ for 2-D ``rows`` (n, in) and W (out, in): (n, out), C-contiguous."""
    n = rows.shape[0]
    if get_array_module(rows) is not np:
        return rows @ weight.T
    if n <= VECDOT_ROWS and _HAS_VECDOT:
        return np.vecdot(weight, rows[:, None, :])
    block = small_kernel_blocks(rows, weight.T)  # float32, 5 to 75 rows, on AVX-512 OpenBLAS
    if block:
        return in_blocks(rows, weight.T, block)
    if n <= WEIGHT_LEFT_ROWS:
        return np.ascontiguousarray((weight @ rows.T).T)
    return rows @ weight.T
