"""Fused ops (closed-form forward and backward) and their composite reference twins."""
from .attention import attention, attention_bias, attention_ref, rope, rope_ref
from .layers import (
    embedding,
    embedding_ref,
    linear,
    linear_ref,
    rms_norm,
    rms_norm_ref,
    silu_mul,
    silu_mul_ref,
)
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .low_rank import low_rank_linear, low_rank_linear_ref
from .softmax import (
    IGNORE_INDEX,
    cross_entropy,
    cross_entropy_ref,
    log_softmax,
    log_softmax_ref,
    softmax,
    softmax_ref,
)

__all__ = [
    "IGNORE_INDEX", "attention", "attention_bias", "attention_ref", "cross_entropy",
    "cross_entropy_ref", "embedding", "embedding_ref", "linear", "linear_cross_entropy",
    "linear_cross_entropy_ref", "linear_ref", "log_softmax", "low_rank_linear", "low_rank_linear_ref",
    "log_softmax_ref", "rms_norm", "rms_norm_ref", "rope", "rope_ref", "silu_mul",
    "silu_mul_ref", "softmax", "softmax_ref",
]
