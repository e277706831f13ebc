"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353),
switched on by ``LoraConfig(use_dora=True)`` and used by the LoRA layers of lora.py.

DoRA splits the adapted weight into a direction and a trainable magnitude m (eq. 5;
PEFT's orientation, W stored (out, in), norms over each output row):

    W' = m ⊙ (W + ΔW) / n,   ΔW = s · B A,   n = ‖W + ΔW‖_row ∈ R^out,   m ∈ R^out

The forward never forms W'. As PEFT, with g = m / n broadcast over output features:

    y = base(x) + (g − 1) ⊙ (x Wᵀ) + g ⊙ s · (x Aᵀ) Bᵀ          (= x W'ᵀ + b)

where x Wᵀ = base(x) − b is reused (with dropout p > 0 in training PEFT recomputes it
on dropout(x), and so do we). n is computed from the current A, B and then treated
as a constant: no gradient flows through it (paper §4.3, "we suggest treating
‖V + ΔV‖_c as a constant"; PEFT and NVlabs/DoRA do the same). The norm is of the
*unmerged* base weight W₀ + ΔW, so merging other adapters first does not change it.

Parameters: m, out numbers per targeted Linear, on top of LoRA's r·(in + out).
Identity at init: m is initialised to n itself, so g = 1 and DoRA equals LoRA for
any A, B (and the base model when B = 0).
Merge: W ← (m/n) ⊙_row (W + ΔW), n cached; unmerge: W ← W / (m/n) − ΔW.
On an Embedding E (num, dim) PEFT normalises columns (over the vocabulary), so m ∈ R^dim
and y = g ⊙ E[ids] + g ⊙ s · A_embᵀ[ids] B_embᵀ (no bias, no dropout).

Several active adapters compose as in PEFT: a DoRA adapter's (g − 1) term multiplies
everything computed before it (result − b), exactly what merging them in turn gives.
Departures from PEFT: none in the arithmetic; PEFT's optional norm cache
(``ENABLE_DORA_CACHING``) is not implemented, the norm is recomputed every forward;
mixed-adapter batches refuse DoRA adapters, as PEFT does.
"""
from __future__ import annotations

from ...autograd.fused import linear
from ...backend import get_array_module
from ...nn import Module, Parameter


class DoraMagnitude(Module):
    """m: one trainable magnitude per output feature (PEFT's ``lora_magnitude_vector.<name>.weight``)."""

    def __init__(self, m):
        self.weight = Parameter(m)


def weight_norm(layer, name: str):
    """n = ‖W₀ + ΔW‖ over the layer's DoRA axis: a plain array, outside the graph (§4.3)."""
    weight = layer.unmerged_base_weight()
    return get_array_module(weight).linalg.norm(weight + layer.delta_weight(name), axis=layer.dora_axis)


def init_magnitude(layer, name: str) -> None:
    """m ← n, so that g = m / n = 1 and the layer starts as plain LoRA."""
    layer.lora_magnitude_vector[name] = DoraMagnitude(weight_norm(layer, name))


def forward(layer, name: str, x, result):
    """result + (g − 1) ⊙ (x Wᵀ) + g ⊙ s (x Aᵀ) Bᵀ with g = m / n, n a constant."""
    g = layer.lora_magnitude_vector[name].weight / weight_norm(layer, name)  # (out,)
    bias = getattr(layer.base_layer, "bias", None)
    if layer.dropout_active(name):  # PEFT: both terms see the same dropped-out input
        x = layer.dropout(name, x)
        base = linear(x, layer.base_layer.weight)
    else:
        base = result if bias is None else result - bias
    return result + (g - 1.0) * base + g * layer.lora_branch(name, x)


def _row_scale(layer, name: str, n):
    """m / n shaped to scale the stored weight along the DoRA axis."""
    g = layer.lora_magnitude_vector[name].weight.data / n
    return get_array_module(g).expand_dims(g, layer.dora_axis)


def merge_into(layer, name: str, weight):
    """W' = (m / n) ⊙ (W + ΔW); n is cached for the exact unmerge."""
    n = weight_norm(layer, name)
    layer.dora_norms[name] = n
    return _row_scale(layer, name, n) * (weight + layer.delta_weight(name))


def unmerge_from(layer, name: str, weight, keep: bool = False):
    """W = W' / (m / n) − ΔW with the n cached by the merge."""
    n = layer.dora_norms[name] if keep else layer.dora_norms.pop(name)
    return weight / _row_scale(layer, name, n) - layer.delta_weight(name)
