"""Child-tuning (Xu et al., 2021, "Raise a Child in Large Language Model: Towards Effective and
Generalizable Fine-tuning", arXiv:2109.05687; code alibaba/AliceMind ChildTuning/): update only a
"child network" of the weights, by masking the gradient (eq. 3:  w ← w − η ∂L/∂w ⊙ M).

Every targeted Linear (W: (out, in), frozen) gets a trainable ΔW (weight_delta.py), y = x(W + ΔW)ᵀ + b.

* mode "F" (task-free, §3.2): ΔW dense (out, in); every step a fresh mask M ~ Bernoulli(p)
  per entry, p = reserve_p, and the gradient becomes  g ← g ⊙ M / p  (eq. 6), so E[g ⊙ M / p] = g.
  The mask is drawn from ``peft_model.rng`` (checkpointed: a resumed run draws the same masks).
* mode "D" (task-driven, §3.3): a fixed mask from the Fisher information of the training data
  (fisher.py: F = mean over batches of the per-tensor-clipped squared gradient, c = max_grad_norm),
  the p-fraction of entries with the largest F over all targeted weights; no rescaling. ΔW is the
  sparse form: the parameter is the values v at the mask, so only masked entries exist to train.

Parameters (what "trainable" counts): F: out·in per targeted Linear (every entry can move: a new
mask each step). D: the mask's size k = n − ⌈(1 − p)(n − 1)⌉ over the n = Σ out·in targeted
entries, the number the authors' rule F ≥ np.percentile(F, (1 − p)·100) keeps when scores are
distinct (ties at the cut: the lower index wins, so k is fixed before calibration).
Identity at init: ΔW = 0. Merge: W ← W + ΔW (D: at the mask only); unmerge subtracts it.

Order of operations (F). The authors mask inside their optimizer (ChildTuningAdamW.step), after
the HF Trainer clipped the full gradient to max_grad_norm; minipeft's trainer calls
``mask_gradients`` after backward and before clipping. The clip then sees ‖g ⊙ M / p‖ ≈ ‖g‖/√p
instead of ‖g‖, so when clipping is active the masked gradient is scaled down by a different
factor. That factor is common to all entries of the step; Adam's update is invariant to such a
scale up to ε and to how it varies between steps, so the difference is small under AdamW, and there
is none when max_grad_norm is None or the clip is inactive. With SGD it changes the step size.
In both modes the mask acts on the gradient before the moments, as the authors', so in F a
masked entry still moves by its momentum.

Weight decay. The authors' AdamW decays every entry of W (decoupled, p ← p − η·λ·p), masked or
not, so in D the unmasked weights shrink towards 0 while never receiving a gradient. Here the base
is frozen and the trainer decays the parameters, ΔW, towards 0 (towards the pretrained W): D's
entries outside the mask do not exist as parameters and never change, with or without decay.
Decaying W itself would need a write to the base weights (or a dense ΔW), which the frozen-base
contract rules out; with weight_decay = 0 (D's mask entries only; F everything) the two agree.

Departures: only targeted Linear weights take part (the authors: every parameter the optimizer
holds in F, every encoder-layer parameter in D, both including biases and LayerNorms); the
Fisher batches are the trainer's training batches in file order; D's mask can be saved
(``save_mask``) and reused (``mask_path``); the authors' default mode (run.sh) is D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...backend import device_random
from ...nn import Linear, ParameterGroup
from ..core import targeting
from ..core.config import PeftConfig, _is_number
from ..core.method import CliOption, CliSpec, PeftMethod
from ..lowrank.lora import TARGET
from . import fisher
from .fishmask import DEFAULT_TARGETS, add_sparse, needs_mask, refuse_placeholder, resume_mask
from .weight_delta import (FISHER, DeltaLinear, MaskFromFile, load_mask_state, read_weights, saved_tensors,
                           set_masks, sparse_layers, split_global)

MODES = ("F", "D")


@dataclass(frozen=True)
class ChildTuningConfig(MaskFromFile, PeftConfig):
    peft_type: ClassVar[str] = "CHILD_TUNING"

    mode: str = "D"  # the authors' run.sh: ChildTuning-D
    reserve_p: float = 0.3  # p: the child network's share (run.sh)
    max_grad_norm: float | None = 1.0  # D: per-tensor clip of each batch's gradient in the Fisher pass
    mask_path: str | None = None  # D: a mask file (save_mask) or adapter file to take the mask from

    def __post_init__(self):
        super().__post_init__()
        self._require("mode", self.mode in MODES, f"must be one of {MODES}")
        self._require("reserve_p", _is_number(self.reserve_p) and 0 < self.reserve_p <= 1, "must lie in (0, 1]")
        self._require("max_grad_norm", self.max_grad_norm is None or (
            _is_number(self.max_grad_norm) and self.max_grad_norm > 0), "must be a number > 0 or None")
        self._require("mask_path", self.mask_path is None or (isinstance(self.mask_path, str) and self.mode == "D"),
                      "must be a path, and is for mode 'D' only")
        if self.modules_to_save:
            self._fail("modules_to_save", "is not supported by Child-tuning (only the targeted weights train)")

    def mask_size(self, n: int) -> int:
        """D's k over n ranked weights (see the module docstring)."""
        return fisher.percentile_count(n, self.reserve_p)


def apply(model, config: ChildTuningConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """F: a dense zero ΔW per targeted Linear; D: the sparse ΔW (placeholder mask, or mask_path's).
    The group is ``child_tuning:<adapter_name>``."""
    if config.mode == "D":
        return add_sparse(model, config, adapter_name, "child_tuning")
    params = []
    for name in targeting.find_targets(model, config, (Linear, DeltaLinear), config.peft_type):
        layer = model.get_submodule(name)
        if not isinstance(layer, DeltaLinear):
            layer = DeltaLinear(layer)
            layer.active_adapters = [adapter_name]
            model.set_submodule(name, layer)
        params.append(layer.add_dense(adapter_name))
    return ParameterGroup(f"child_tuning:{adapter_name}", params)


def mask_gradients(peft_model, name: str, step: int) -> None:
    """F: g ← g ⊙ M / p with a fresh M ~ Bernoulli(p) per entry (eq. 6). D: nothing to mask (only
    the mask's entries are parameters), but a step on an uncalibrated mask is refused."""
    config = peft_model.peft_config[name]
    if config.mode == "D":
        return refuse_placeholder(peft_model, name, step)
    p = config.reserve_p
    for _, layer in peft_model.adapter_layers(name, DeltaLinear):
        delta = layer.delta_weight[name]
        if delta.grad is None:
            continue
        keep = device_random(peft_model.rng, lambda r, s=delta.shape: (r.random(s) < p) / p, delta.device)
        delta.grad = delta.grad * keep.astype(delta.grad.dtype)


def calibrate(peft_model, name: str, batches) -> None:
    """D: the Fisher mask (mean over batches of per-tensor-clipped squared gradients, top p share).
    F needs no calibration."""
    config = peft_model.peft_config[name]
    if config.mode != "D" or not needs_mask(peft_model, name):
        return
    weights = [layer.base_layer.weight for _, layer in sparse_layers(peft_model, name)]
    scores, batches_seen = fisher.fisher_scores(peft_model, weights, fisher.whole_batches(batches),
                                                max_grad_norm=config.max_grad_norm)
    scores = [s / batches_seen for s in scores]  # the mean: F = (1/B) Σ_b g_b² (irrelevant to the ranking)
    sizes = [int(w.size) for w in weights]
    chosen = fisher.top_k(scores, config.mask_size(int(np.sum(sizes))))
    set_masks(peft_model, name, split_global(chosen, sizes), FISHER)


# ----- the method's row in the table, and its command line -------------------------------------
RESERVE_P = CliOption(("--reserve-p",), dict(type=float, default=0.3,
                                             help="Child-tuning: p, the child network's share (default 0.3)"))


def cli_config(mode):
    def build(args) -> ChildTuningConfig:
        return ChildTuningConfig(target_modules=targeting.parse_targets(args.target), mode=mode,
                                 reserve_p=args.reserve_p, mask_path=resume_mask(args) if mode == "D" else None)
    return build


METHOD = PeftMethod(
    "CHILD_TUNING", ChildTuningConfig, apply, DeltaLinear, "child_tuning", default_target_modules=DEFAULT_TARGETS,
    mask_gradients=mask_gradients, calibrate=calibrate, saved_tensors=saved_tensors,
    read_folder_weights=read_weights, load_extra=load_mask_state,
    cli=CliSpec({"child-f": cli_config("F"), "child-d": cli_config("D")}, (TARGET, RESERVE_P),
                "Child-tuning (uses --target; child-d's Fisher pass reads --data)"))

__all__ = ["ChildTuningConfig", "METHOD", "apply", "calibrate", "mask_gradients"]
