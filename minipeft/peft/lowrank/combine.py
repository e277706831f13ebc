"""New LoRA adapters from weighted combinations of existing ones: PEFT's
``add_weighted_adapter`` (REFERENCE 1.13), with the exact sum made explicit.

For adapters i with factors A_i (r_i, in), B_i (out, r_i), scalings s_i and weights
w_i, in every layer that holds them (embeddings in the same B A orientation):

* ``"cat"`` (alias ``"exact"``): A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (rows),
  B = [B_1, B_2, ...] (columns), rank Σ r_i, so B A = Σ w_i s_i B_i A_i **exactly**:
  the combined adapter computes the weighted sum of the ΔW's.
* ``"linear"``: PEFT's semantics, which combine A and B *separately*:
  A = Σ sign(w_i s_i) √|w_i s_i| A_i,  B = Σ √|w_i s_i| B_i  (equal ranks required), so
  B A = Σ_i w_i s_i B_i A_i + Σ_{i≠j} √|w_i s_i| sign(w_j s_j) √|w_j s_j| B_i A_j:
  the cross terms (i ≠ j) make it *not* the weighted sum (PEFT issue #3004).
  With one adapter PEFT always uses "linear" (then it is exact), and so does this.
* ``"svd"`` (PEFT's default): ΔW = Σ w_i s_i B_i A_i, ΔW = U S Vᵀ, B = U_k diag(S_k),
  A = V_kᵀ with k = svd_rank or max r_i: the best rank-k approximation of the sum
  (exact when k ≥ rank ΔW); ``svd_clamp`` clips U_k S_k and V_kᵀ to that quantile
  of their entries.

The new adapter has r = lora_alpha = its rank, hence s = 1; it is added frozen and
not active. Departures from PEFT: rsLoRA is switched off in the new config, so
s = 1 really holds (PEFT 0.21 keeps use_rslora and over-scales by √r, fixed upstream
in PR #3449); an existing name raises instead of returning silently; DoRA adapters
are refused (their magnitudes cannot be combined; PEFT silently drops them);
modules_to_save copies are not combined (PEFT makes fresh copies of the originals);
a layer holding none of the adapters keeps a zero adapter; svd runs in float64.
"""
from __future__ import annotations

import math

import numpy as np

from ...backend import to_device, to_numpy
from .lora import LoraConfig, LoraLayer

COMBINATIONS = ("svd", "linear", "cat", "exact")


def add_weighted_adapter(peft_model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, svd_full_matrices: bool = True) -> None:
    configs = _check(peft_model, adapters, weights, adapter_name, combination_type)
    kind = "linear" if len(adapters) == 1 else "cat" if combination_type == "exact" else combination_type
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if kind == "linear" and len(set(ranks)) != 1:
        raise ValueError(f"combination_type='linear' needs adapters of equal rank, got ranks {ranks}")
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[kind]
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        union = "|".join(f"({t})" for t in targets)
    elif not any(isinstance(t, str) for t in targets):
        union = tuple(sorted({name for t in targets for name in t}))
    else:
        raise ValueError("cannot combine adapters whose target_modules mix regex strings and lists (as in PEFT)")
    config = configs[0].replace(r=new_rank, lora_alpha=new_rank, target_modules=union, rank_pattern={},
                                alpha_pattern={}, use_rslora=False, use_dora=False, init_lora_weights=True,
                                modules_to_save=None)
    peft_model.add_adapter(adapter_name, config)
    for layer in peft_model.adapter_modules():
        if isinstance(layer, LoraLayer) and adapter_name in layer.adapter_names():
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names()]
            if present:
                A, B = combined_factors(layer, present, kind, new_rank, svd_clamp, svd_full_matrices)
                for target, value in zip(layer.factors(adapter_name), (A, B)):
                    target.data = to_device(value.astype(target.dtype), target.device)


def combined_factors(layer, present, kind: str, rank: int, clamp=None, full_matrices=True):
    """The new (A, B) of one layer, zero-padded to ``rank``; float64 host arrays."""
    factors = [tuple(to_numpy(t.data).astype(np.float64) for t in layer.factors(a)) for a, _ in present]
    scaled = [w * layer.scaling[a] for a, w in present]  # w_i s_i
    if kind == "cat":
        A = np.concatenate([c * A_i for c, (A_i, _) in zip(scaled, factors)], axis=0)
        B = np.concatenate([B_i for _, B_i in factors], axis=1)
    elif kind == "linear":
        A = sum(math.copysign(math.sqrt(abs(c)), c) * A_i for c, (A_i, _) in zip(scaled, factors))
        B = sum(math.sqrt(abs(c)) * B_i for c, (_, B_i) in zip(scaled, factors))
    else:  # svd of the exact weighted sum
        delta = sum(c * (B_i @ A_i) for c, (A_i, B_i) in zip(scaled, factors))
        U, S, Vh = np.linalg.svd(delta, full_matrices=full_matrices)
        k = min(rank, len(S))
        B, A = U[:, :k] * S[:k], Vh[:k]
        if clamp is not None:
            high = np.quantile(np.concatenate([B.ravel(), A.ravel()]), clamp)
            B, A = np.clip(B, -high, high), np.clip(A, -high, high)
    A_out = np.zeros((rank, A.shape[1]))
    B_out = np.zeros((B.shape[0], rank))
    A_out[:A.shape[0]], B_out[:, :B.shape[1]] = A, B
    return A_out, B_out


def _check(peft_model, adapters, weights, adapter_name, combination_type) -> list[LoraConfig]:
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r} "
                         "(PEFT's ties / dare_* / magnitude_prune are not implemented)")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    missing = [a for a in adapters if a not in peft_model.peft_config]
    if missing:
        raise ValueError(f"adapter(s) {missing} do not exist; adapters: {sorted(peft_model.peft_config)}")
    configs = [peft_model.peft_config[a] for a in adapters]
    if not all(isinstance(c, LoraConfig) and c.peft_type == "LORA" for c in configs):  # not DyLoRA / ReLoRA
        raise ValueError("add_weighted_adapter combines LoRA adapters only")
    dora = [a for a, c in zip(adapters, configs) if c.use_dora]
    if dora:
        raise ValueError(f"cannot combine DoRA adapters {dora}: their magnitude vectors have no weighted sum")
    saved = [m for c in configs for m in set(c.modules_to_save or ())]
    if len(saved) != len(set(saved)):
        raise ValueError("cannot combine adapters that have modules_to_save copies of the same module (as in PEFT)")
    return configs
