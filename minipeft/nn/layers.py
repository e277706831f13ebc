"""The layers a LLaMA needs: Linear, Embedding, RMSNorm.

Attribute names (``weight``, ``bias``) follow PyTorch, so parameter names equal
Hugging Face checkpoint keys.
"""
from __future__ import annotations

import numpy as np

from ..autograd.fused import embedding, linear, rms_norm
from . import init
from .module import Module, Parameter


class Linear(Module):
    """y = x Wᵀ + b, W of shape (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 rng: np.random.Generator | None = None, dtype=np.float32):
        self.in_features, self.out_features = in_features, out_features
        if rng is None:
            weight = init.zeros((out_features, in_features), dtype)
        else:
            weight = init.kaiming_uniform((out_features, in_features), rng, dtype=dtype)
        self.weight = Parameter(weight)
        self.bias = Parameter(init.zeros((out_features,), dtype)) if bias else None

    def forward(self, x):
        return linear(x, self.weight, self.bias)

    def __repr__(self):
        return f"Linear(in={self.in_features}, out={self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """Lookup of rows of W (num_embeddings, embedding_dim) by integer id."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 rng: np.random.Generator | None = None, dtype=np.float32):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        shape = (num_embeddings, embedding_dim)
        self.weight = Parameter(init.zeros(shape, dtype) if rng is None else init.normal(shape, rng, dtype=dtype))

    def forward(self, ids):
        return embedding(self.weight, ids)

    def __repr__(self):
        return f"Embedding({self.num_embeddings}, {self.embedding_dim})"


class RMSNorm(Module):
    """y = w ⊙ x / √(mean(x²) + ε) over the last axis (LLaMA's norm, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=np.float32):
        self.eps = eps
        self.weight = Parameter(init.ones((dim,), dtype))

    def forward(self, x):
        return rms_norm(x, self.weight, eps=self.eps)

    def __repr__(self):
        return f"RMSNorm({self.weight.shape[0]}, eps={self.eps})"
