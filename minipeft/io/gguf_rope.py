"""Llama 3's RoPE scaling in GGUF: the ``rope_freqs.weight`` tensor <-> transformers' ``rope_scaling``.

transformers describes Llama 3.1 / 3.2's scaled rotary frequencies by four numbers
(``rope_scaling = {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
"original_max_position_embeddings"}``); llama.cpp's ``convert_hf_to_gguf.py`` turns them into one
divisor per frequency, stored as the F32 tensor ``rope_freqs.weight`` (Dh/2 values), and rotates
by θⱼ / fⱼ. With θⱼ = base^(−2j/Dh), wavelength λⱼ = 2π/θⱼ and L the original context length:

    fⱼ = 1                                   λⱼ < L / high        (short wavelengths: kept)
    fⱼ = factor                              λⱼ > L / low         (long ones: slowed down)
    fⱼ = 1 / ((1 − sⱼ)/factor + sⱼ)          in between, sⱼ = (L/λⱼ − low) / (high − low)

which is transformers' ``_compute_llama3_parameters`` written as a divisor. Reading inverts it:
factor is the largest divisor; in the band, sⱼ = (1/fⱼ − 1/factor) / (1 − 1/factor) is affine in
1/λⱼ, sⱼ = (L/(high − low))·(1/λⱼ) − low/(high − low), and (L, low, high) scaled together give
the same numbers, so low = 1 (Llama 3's own value) fixes them. When the band holds fewer than
two frequencies the line cannot be fitted; Llama 3's published numbers (low 1, high 4, L 8192,
the converter's defaults too) are tried first. Either way the four numbers are accepted only if
they give the file's divisors back; otherwise the file is refused.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import CheckpointError

TENSOR_NAME = "rope_freqs.weight"
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_MATCH = dict(rtol=1e-5, atol=1e-6)  # divisors are stored as float32


def base_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """θⱼ = base^(−2j/Dh) in float32, as the converter (and transformers) compute them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def llama3_divisors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp's converter writes for a llama3 ``rope_scaling``."""
    # The converter runs this loop on torch float32 scalars; every step here is float32 too, so the
    # same bits come out.
    f32 = np.float32
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    length = scaling["original_max_position_embeddings"]
    divisors = []
    for frequency in base_frequencies(theta, head_dim):
        wavelength = f32(2 * math.pi) / frequency
        if wavelength < f32(length / high):
            divisors.append(f32(1))
        elif wavelength > f32(length / low):
            divisors.append(f32(factor))
        else:
            smooth = (f32(length) / wavelength - f32(low)) / f32(high - low)
            divisors.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(divisors, dtype=np.float32)


def llama3_scaling(divisors: np.ndarray, theta: float, head_dim: int, path) -> dict | None:
    """transformers' llama3 ``rope_scaling`` whose divisors are ``divisors`` (None if all are 1);
    CheckpointError naming the file and the tensor when no such four numbers exist."""
    where = f"{path}: tensor {TENSOR_NAME!r}"
    divisors = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if divisors.shape[0] != head_dim // 2:
        raise CheckpointError(f"{where} holds {divisors.shape[0]} values; the head size {head_dim} needs "
                              f"{head_dim // 2}, one per rotary frequency")
    if not (np.isfinite(divisors).all() and (divisors >= 1 - 1e-6).all()):
        raise CheckpointError(f"{where} must hold finite divisors >= 1 (Llama 3's RoPE factors)")
    factor = float(str(np.float32(divisors.max())))  # the shortest decimal of the stored float32
    if np.allclose(divisors, 1.0, **_MATCH):
        return None
    candidates = [dict(LLAMA3_DEFAULTS, factor=factor)]
    fitted = _fit_band(divisors, factor, base_frequencies(theta, head_dim))
    if fitted is not None:
        candidates.append(dict(fitted, factor=factor))
    for scaling in candidates:
        if np.allclose(llama3_divisors(theta, head_dim, scaling), divisors, **_MATCH):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": scaling["low_freq_factor"],
                    "high_freq_factor": scaling["high_freq_factor"],
                    "original_max_position_embeddings": scaling["original_max_position_embeddings"]}
    raise CheckpointError(f"{where} does not hold Llama 3-style RoPE factors (1 for short wavelengths, "
                          f"{factor:g} for long ones, a smooth band between), so minipeft cannot tell "
                          "the rope_scaling it stands for")


def _fit_band(divisors, factor: float, frequencies) -> dict | None:
    """low, high and L from the divisors strictly inside the band (see the module docstring), or
    None when fewer than two lie there or they do not describe a band."""
    inside = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    if inside.sum() < 2 or factor <= 1:
        return None
    smooth = (1 / divisors[inside] - 1 / factor) / (1 - 1 / factor)
    inverse_wavelength = frequencies[inside].astype(np.float64) / (2 * math.pi)
    slope, intercept = np.polyfit(inverse_wavelength, smooth, 1)  # s = slope/λ + intercept
    if not (slope > 0 and intercept < 0):
        return None
    width = -1 / intercept  # high − low, with low = 1
    length = slope * width  # an integer in transformers' config: a fit that is not one is no band
    if abs(length - round(length)) > 1e-3 * length:
        return None
    return {"low_freq_factor": 1.0, "high_freq_factor": float(f"{1 + width:.6g}"),
            "original_max_position_embeddings": int(round(length))}
