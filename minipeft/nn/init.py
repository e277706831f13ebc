"""Weight initialisers. Each takes an explicit ``numpy.random.Generator``.

Numbers are drawn on the host in float64 and cast, so a seed gives the same
weights on every backend and every machine.
"""
from __future__ import annotations

import math

import numpy as np


def kaiming_uniform(shape, rng: np.random.Generator, a: float = math.sqrt(5), dtype=np.float32):
    """U(−bound, bound), bound = gain·√(3/fan_in), gain = √(2/(1+a²)); torch's Linear default.

    With a = √5 this is U(−1/√fan_in, 1/√fan_in). fan_in = shape[1] for W (out, in).
    """
    fan_in = shape[1] if len(shape) > 1 else shape[0]
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape, rng: np.random.Generator, std: float = 1.0, mean: float = 0.0, dtype=np.float32):
    """N(mean, std²) entries."""
    return rng.normal(mean, std, size=shape).astype(dtype)


def uniform(shape, rng: np.random.Generator, low: float, high: float, dtype=np.float32):
    return rng.uniform(low, high, size=shape).astype(dtype)


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def ones(shape, dtype=np.float32):
    return np.ones(shape, dtype=dtype)
