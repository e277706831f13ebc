"""FishMask: training a fixed sparse mask chosen by Fisher information (Sung, Nair & Raffel, 2021,
"Training Neural Networks with Fixed Sparse Masks", arXiv:2111.09839; code varunnair18/FISH,
run_glue_sparse_update.py).

Calibration (once, before training; fisher.py): the empirical Fisher of every targeted weight,

    F = Σ_{n ≤ N} (∂L_n/∂W)²        batch size 1, the first N = num_samples training examples

then one global ranking over all targeted weights: the mask M holds the k largest scores,

    k = int(n · keep_ratio),   n = Σ out·in over the targeted Linears

and only those entries train (weight_delta.py, sparse form; W: (out, in)):

    y = x (W + ΔW)ᵀ + b,   ΔW.flat[M] = v,  ΔW = 0 elsewhere,   v: (k_layer,) per layer

Parameters: k in all (each layer holds its share k_layer of the global top-k).
Identity at init: v = 0. Merge: W.flat[M] += v (exact: the sparse file applied to the base weights
is the trained model); unmerge subtracts v.

Before calibration the mask is a placeholder with the same k, spread evenly over the weights
(weight_delta.placeholder_mask): the adapter is a well-formed identity that can be saved, merged
and differentiated, but its mask means nothing, so the trainer's ``mask_gradients`` hook refuses
to step it. The Trainer calibrates a fresh run itself; ``calibrate`` keeps a mask that came from a
file (``from_pretrained``, ``mask_path``) or an earlier calibration. ``save_mask`` writes the mask
for reuse through ``mask_path``; ``minipeft train --resume`` passes the checkpoint's mask that way.

Departures from FISH: only the targeted Linear weights are ranked and trained (FISH ranks every
parameter but the classifier, which it always trains: a causal LM has no task head; embeddings,
norms and lm_head stay frozen here); N examples are the first N of the training file, in file
order (FISH shuffles); ties at the cut go to the lower index; the default mask_method is the
paper scripts' "label-square" (the code's default is "label-absolute"; both offered); the base
weights stay frozen and ΔW is trained instead (the same function: gradients and Adam moments of v
are those of W at M).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ...errors import ConfigError
from ...nn import Linear, ParameterGroup
from ..core import targeting
from ..core.config import PeftConfig, _is_int, _is_number
from ..core.method import CliOption, CliSpec, PeftMethod
from ..core.names import WEIGHTS_NAME
from ..lowrank.lora import TARGET
from . import fisher
from .weight_delta import (FILE, FISHER, PLACEHOLDER, DeltaLinear, MaskFromFile, load_mask_state, mask_sources,
                           placeholder_mask, read_mask, read_weights, save_mask, saved_tensors, set_masks,
                           sparse_layers, split_global)

# every Linear of a decoder layer (the paper selects among all weights; lm_head stays frozen)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MASK_METHODS = ("label-square", "label-absolute")


@dataclass(frozen=True)
class FishMaskConfig(MaskFromFile, PeftConfig):
    peft_type: ClassVar[str] = "FISHMASK"

    keep_ratio: float = 0.005  # FISH's default
    num_samples: int = 1024  # FISH's default
    mask_method: str = "label-square"  # FISH's paper scripts
    mask_path: str | None = None  # a mask file (save_mask) or adapter file to take M from

    def __post_init__(self):
        super().__post_init__()
        self._require("keep_ratio", _is_number(self.keep_ratio) and 0 < self.keep_ratio <= 1, "must lie in (0, 1]")
        self._require("num_samples", _is_int(self.num_samples) and self.num_samples >= 1, "must be an integer >= 1")
        self._require("mask_method", self.mask_method in MASK_METHODS, f"must be one of {MASK_METHODS}")
        self._require("mask_path", self.mask_path is None or isinstance(self.mask_path, str), "must be a path")
        if self.modules_to_save:
            self._fail("modules_to_save", "is not supported by FishMask (only the masked weights train)")

    def mask_size(self, n: int) -> int:
        """k = int(n · keep_ratio), FISH's keep_num for n ranked weights."""
        return int(n * self.keep_ratio)


def apply(model, config: FishMaskConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """Wrap the targeted Linears in DeltaLinear layers with a sparse ΔW of k entries in all (the
    placeholder mask, or ``mask_path``'s), returned as the group ``fishmask:<adapter_name>``."""
    return add_sparse(model, config, adapter_name, "fishmask")


def add_sparse(model, config, adapter_name: str, prefix: str) -> ParameterGroup:
    """Shared with Child-tuning D: the layers, then the mask (checked before anything changes)."""
    names = targeting.find_targets(model, config, (Linear, DeltaLinear), config.peft_type)
    sizes = [int(model.get_submodule(n).weight.size if isinstance(model.get_submodule(n), Linear)
                 else model.get_submodule(n).size) for n in names]
    k = config.mask_size(sum(sizes))
    if k < 1:
        raise ConfigError(f"{type(config).__name__}: keeps no entry of the {sum(sizes)} targeted weights; "
                          "raise the ratio or target more modules")
    layers = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, DeltaLinear):
            layer = DeltaLinear(layer)
            layer.active_adapters = [adapter_name]
        layers.append((name, layer))
    if config.mask_path is not None:
        masks, source = read_mask(config.mask_path, layers, expected=k), FILE
    else:
        masks, source = placeholder_mask(sizes, k), PLACEHOLDER
    params = []
    for (name, layer), mask in zip(layers, masks):
        model.set_submodule(name, layer)
        params.append(layer.add_sparse(adapter_name, mask, source))
    return ParameterGroup(f"{prefix}:{adapter_name}", params)


def calibrate(peft_model, name: str, batches) -> None:
    """The mask: Fisher of the first num_samples examples, one at a time; global top-k."""
    config = peft_model.peft_config[name]
    if not needs_mask(peft_model, name):
        return
    layers = sparse_layers(peft_model, name)
    weights = [layer.base_layer.weight for _, layer in layers]
    scores, _ = fisher.fisher_scores(peft_model, weights, fisher.examples_of(batches, config.num_samples),
                                     square=config.mask_method == "label-square",
                                     progress_total=config.num_samples)
    chosen = fisher.top_k(scores, config.mask_size(sum(int(w.size) for w in weights)))
    set_masks(peft_model, name, split_global(chosen, [int(w.size) for w in weights]), FISHER)


def needs_mask(peft_model, name: str) -> bool:
    """True while the adapter's mask is the placeholder (then ΔW must still be zero)."""
    if mask_sources(peft_model, name) != {PLACEHOLDER}:
        return False
    if any(bool((layer.delta_values[name].data != 0).any()) for _, layer in sparse_layers(peft_model, name)):
        raise ConfigError(f"adapter {name!r}: calibrate chooses the mask before training, but ΔW is no longer "
                          "zero on the placeholder mask; start from a fresh adapter")
    return True


def refuse_placeholder(peft_model, name: str, step: int) -> None:
    """The ``mask_gradients`` hook: a training step on a mask nobody chose is refused."""
    if PLACEHOLDER in mask_sources(peft_model, name):
        raise ConfigError(f"adapter {name!r} ({peft_model.peft_config[name].peft_type}) has no mask yet: call "
                          "peft_model.calibrate(batches) before training (the Trainer does on a fresh run), or "
                          "load one (mask_path, PeftModel.from_pretrained)")


# ----- the method's row in the table, and its command line -------------------------------------
KEEP_RATIO = CliOption(("--keep-ratio",), dict(type=float, default=0.005,
                                               help="FishMask: share of the targeted weights trained (default 0.005)"))
FISHER_SAMPLES = CliOption(("--fisher-samples",), dict(
    type=int, default=1024, help="FishMask: examples in the Fisher pass, one at a time (default 1024)"))


def resume_mask(args) -> str | None:
    """``--resume``: the mask of the checkpoint to continue, so the parameters get its sizes."""
    checkpoint = getattr(args, "resume_checkpoint", None)  # set by minipeft train (CliSpec)
    return None if checkpoint is None else str(Path(checkpoint) / "adapter" / WEIGHTS_NAME)


def cli_config(args) -> FishMaskConfig:
    return FishMaskConfig(target_modules=targeting.parse_targets(args.target), keep_ratio=args.keep_ratio,
                          num_samples=args.fisher_samples, mask_path=resume_mask(args))


METHOD = PeftMethod(
    "FISHMASK", FishMaskConfig, apply, DeltaLinear, "fishmask", default_target_modules=DEFAULT_TARGETS,
    mask_gradients=refuse_placeholder, calibrate=calibrate, saved_tensors=saved_tensors,
    read_folder_weights=read_weights, load_extra=load_mask_state,
    cli=CliSpec({"fishmask": cli_config}, (TARGET, KEEP_RATIO, FISHER_SAMPLES),
                "FishMask (uses --target; the Fisher pass reads --data)"))

__all__ = ["FishMaskConfig", "METHOD", "apply", "calibrate", "save_mask"]
