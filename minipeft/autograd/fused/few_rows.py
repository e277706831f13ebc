"""x Wᵀ for any number of rows, with the fastest BLAS path for few of them.

``times_transposed(rows, W)`` is what Linear and the fused LoRA layer multiply by; it
returns the same numbers as ``rows @ W.T`` (to rounding), C-contiguous. Many rows (training)
go straight to BLAS. Few rows (decoding, a short prompt) make the product memory-bound —
every weight is read for a handful of multiply-adds — and the general BLAS path first
copies ("packs") W into its blocking layout, one more pass over W than the product needs.
So, on the CPU:

* up to ``VECDOT_ROWS`` rows: NumPy's own dot-product loop (``np.vecdot``, one dot per row of
  W) streams W about twice as fast as OpenBLAS's matrix-vector kernel for a row-major W
  (SmolLM2-135M's weights: 23 vs 12 GB/s on one core);
* up to ``SMALL_KERNEL_MAX_ROWS`` rows, float32, when NumPy's OpenBLAS has its AVX-512
  small-matrix kernels (core types SkylakeX, Cooperlake, SapphireRapids; Zen 4 runs them):
  W in blocks of rows small enough for those kernels, which multiply without packing. Its
  rule (OpenBLAS, kernel/x86_64/sgemm_small_kernel_permit_skylakex.c): M·N·K ≤ 10⁶ and, for
  NumPy's row-major x Wᵀ (a transposed-A product to column-major BLAS), M·N ≤ 1200;
* up to ``WEIGHT_LEFT_ROWS`` rows otherwise: (W xᵀ)ᵀ, W the left operand that OpenBLAS
  streams (1.1-1.3x at 22 rows; from 64 rows x Wᵀ is as fast or faster).

Measured (one core, 40 weights of 1536 × 576 read in turn, as a forward reads a model's,
GFLOP/s; (W xᵀ)ᵀ → blocks): 8 rows 22.7 → 32.1, 22 rows 43.3 → 58.7, 32 rows 56.7 → 65.3,
64 rows 72.4 → 77.9; the LM head of SmolLM2 (49152 × 576) at 22 rows 40.2 → 58.8.
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
SMALL_KERNEL_MAX_ROWS = SMALL_KERNEL_MN // BLOCK_MULTIPLE  # 75: a block of 16 weight rows still fits
AVX512_CORES = frozenset({"SkylakeX", "Cooperlake", "SapphireRapids"})


@functools.lru_cache(maxsize=1)
def has_small_sgemm_kernels() -> bool:
    """Whether the OpenBLAS NumPy loaded runs a core type with the small-matrix kernels."""
    from threadpoolctl import threadpool_info  # noqa: PLC0415 - a dependency, loaded when first needed

    return any(info.get("internal_api") == "openblas" and info.get("architecture") in AVX512_CORES
               for info in threadpool_info())


def small_kernel_block(n_rows: int, width: int) -> int:
    """How many rows of W (out, width) one product with ``n_rows`` rows may take so that
    OpenBLAS's small-matrix kernel runs it: a multiple of 16, or 0 when none fits."""
    if width < SMALL_KERNEL_MIN_K:
        return 0
    block = min(SMALL_KERNEL_MN // n_rows, SMALL_KERNEL_MNK // (n_rows * width))
    return block - block % BLOCK_MULTIPLE


def times_transposed(rows, weight):
    """rows Wᵀ for 2-D ``rows`` (n, in) and W (out, in): (n, out), C-contiguous."""
    n = rows.shape[0]
    if get_array_module(rows) is not np:
        return rows @ weight.T
    if n <= VECDOT_ROWS and _HAS_VECDOT:
        return np.vecdot(weight, rows[:, None, :])
    if n <= SMALL_KERNEL_MAX_ROWS and rows.dtype == weight.dtype == np.float32 and has_small_sgemm_kernels():
        block = small_kernel_block(n, rows.shape[1])
        if block:
            return in_weight_blocks(rows, weight, block)
    if n <= WEIGHT_LEFT_ROWS:
        return np.ascontiguousarray((weight @ rows.T).T)
    return rows @ weight.T


def in_weight_blocks(rows, weight, block: int):
    """rows Wᵀ computed ``block`` rows of W at a time, into one (n, out) output."""
    out = np.empty((rows.shape[0], weight.shape[0]), dtype=np.result_type(rows, weight))
    for start in range(0, weight.shape[0], block):
        np.matmul(rows, weight[start:start + block].T, out=out[:, start:start + block])
    return out
