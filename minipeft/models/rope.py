"""Rotary position embedding tables: inverse frequencies and cos / sin per position.

θ_j = base^(−2j/Dh), j = 0 … Dh/2 − 1, and position p rotates the pair
(x_j, x_{j+Dh/2}) by the angle p·θ_j (HF's rotate-half layout). Scalings:
* ``linear``: θ_j / factor;
* ``llama3``: long wavelengths (λ = 2π/θ > original_len / low_freq_factor) are
  divided by ``factor``, short ones (λ < original_len / high_freq_factor) kept,
  and the band between blended smoothly (as transformers'
  ``_compute_llama3_parameters``).
Everything is computed in float32 the way transformers does, so angles at
large positions round the same.
"""
from __future__ import annotations

import math

import numpy as np

from .config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """θ_j for j < head_dim/2 as float32, after any rope scaling."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    kind, scaling = config.rope_type, config.rope_scaling or {}
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(inv_freq: np.ndarray, position_ids: np.ndarray, dtype=np.float32):
    """Host arrays cos, sin of shape (B, 1, T, Dh) for integer ``position_ids`` (B, T).

    The angle is a float32 product p·θ_j, as in transformers; the two halves of
    the last axis repeat it (rotate-half layout).
    """
    angles = np.asarray(position_ids).astype(np.float32)[:, :, None] * inv_freq[None, None, :]  # (B, T, Dh/2)
    angles = np.concatenate((angles, angles), axis=-1)[:, None]  # (B, 1, T, Dh)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
