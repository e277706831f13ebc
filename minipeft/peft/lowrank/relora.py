"""ReLoRA: high-rank training through low-rank updates (Lialin et al., 2023, arXiv:2307.05695;
the authors' code is Guitaricet/relora, REFERENCE 2.6).

Between restarts the adapter is LoRA (lora.py): y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ with
A (r, in), B (out, r), s = α / r. Every N = reset_every updates (§3):

    W ← W + s · B A                         merge: the model's function is unchanged
    A ← kaiming-uniform(a=√5),  B ← 0       re-init from PeftModel.rng: ΔW = 0 again
    m, v of A and B ← 0 but at the top (1 − ρ) entries by |m|         (ρ = prune_ratio)

so after k restarts  W = W₀ + Σ_{j=1..k} s B_j A_j,  of rank up to k·r, while each cycle trains
only r·(in + out) numbers per layer. The LR follows the jagged cosine
(``schedules.jagged_cosine``: restart_every = N), which is 0 at the update that precedes
each merge.

When: the code merges when update_step % N == 1, i.e. after update nN + 1 (1-based), the
update the jagged schedule runs at lr 0; here ``on_step_end(step)`` with step ≥ N and
step % N == 0 (0-based: the same update). The optimizer state is pruned at the same steps
by ``edit_optimizer_state`` (the trainer hands over its optimizer after on_step_end): for
each LoRA parameter the k = round((1 − ρ)·n) entries of largest |m| (AdamW's exp_avg, SGD's
momentum; ties: the first in flat order) are kept, in m and in v alike, the rest zeroed; step
counts stay (bias correction goes on, as in the code). ρ = 0.99 is the paper's magnitude
pruning (the code's default is a full reset, random pruning 0.999); ρ = 1 is a full reset.

Parameters: LoRA's, r·(in + out) per Linear (r·(num + dim) per Embedding, re-initialised
as LoRA's: A_emb = 0, B_emb ~ N(0, 1)); the merged updates live in W, not in parameters.
Identity at init: as LoRA (B = 0). Merge (merge_adapter, minipeft merge): LoRA's
W ← W + s B A on top of the restarts already in W; ``minipeft merge`` thus writes
W₀ + Σ_j s B_j A_j + s B A as a plain HF model.

Saving: PEFT's LoRA layout (peft_type "RELORA", the current A and B) plus, always (empty
before the first restart; loading refuses a folder without it), ``relora_merged.safetensors``:
per module the merged factors concatenated over the k restarts,
``base_model.model.<module>.relora_merged_A`` (k·r, in) and ``...relora_merged_B`` (out, k·r).
Loading replays the merges W ← W + s B_j A_j on the base weights in order, the same
arithmetic, so the loaded model computes bit for bit what was
saved; the trainer's checkpoints restore them the same way (PeftModel.load_method_state).
``accumulated_delta_rank(model)``: the numerical rank of W_now − W₀ per module, from those
factors in float64 (Σ_j s B_j A_j + s B A, i.e. without W's rounding).

Departures from the code: A is kaiming-uniform at init (the code also zeroes A, so nothing
trains before its first restart: it relies on a full-rank warm start); no trainable
scaling, 4-bit merges or warm-start ``adjust_step``; restarts and optimizer resets share one
period N; magnitude pruning only, with one mask for m and v: the code prunes each by its own
magnitude (|x| > quantile(|x|, ρ)), so an entry can keep m and lose v, and right after a
restart A's gradient is exactly 0 (B = 0): Adam's step there is m̂ / (0 + ε) = 10⁸ m̂ (on the
bundled stories260K with r = 2 that took the eval loss from 0.89 to 6.6). DoRA, PiSSA and
tied target weights are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...backend import get_array_module, to_device, to_numpy
from ...errors import CheckpointError, ConfigError
from ...io import read_safetensors, write_safetensors
from ...nn import Embedding, Linear
from ..core import targeting
from . import lora
from ..core.base import layers_holding, refuse_tied
from ..core.config import _is_int, _is_number
from ..core.method import CliOption, CliSpec, PeftMethod
from ..core.names import PREFIX
from .lora import ALPHA, DROPOUT, TARGET, R, LoraConfig, LoraEmbedding, LoraLinear

MERGED_NAME = "relora_merged.safetensors"


@dataclass(frozen=True)
class ReLoraConfig(LoraConfig):
    """LoRA's fields with the authors' ReLoRaModel defaults, plus the restart period and pruning."""

    peft_type: ClassVar[str] = "RELORA"

    r: int = 128
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    reset_every: int = 5000  # N: merge, re-init and prune after update nN + 1 (README: --relora 5000)
    prune_ratio: float = 0.99  # ρ: share of each optimizer moment zeroed at a restart (paper: 0.99)

    def __post_init__(self):
        super().__post_init__()
        self._require("reset_every", _is_int(self.reset_every) and self.reset_every >= 1, "must be an integer >= 1")
        self._require("prune_ratio", _is_number(self.prune_ratio) and 0 <= self.prune_ratio <= 1, "must lie in [0, 1]")
        self._require("use_dora", not self.use_dora, "must be false for ReLoRA")
        self._require("init_lora_weights", self.init_lora_weights != "pissa", "cannot be 'pissa' for ReLoRA")


class ReLoraLayer:
    """Mixed into LoRA's layers: remembers the factors merged at each restart."""

    def __init__(self, base_layer, rng):
        super().__init__(base_layer, rng)
        self.relora_merged: dict[str, list[tuple]] = {}  # adapter -> [(A_j, B_j) arrays], one per restart

    def update_layer(self, name, r, alpha, config, rng) -> None:
        super().update_layer(name, r, alpha, config, rng)
        self.relora_merged[name] = []

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.relora_merged.pop(name, None)

    def absorb(self, name: str, A, B) -> None:
        """W ← W + s B A (ᵀ for an embedding), remembered: a restart's merge, or its replay on load."""
        weight, delta = self.base_layer.weight, self.scaling[name] * (B @ A)
        weight.data = weight.data + (delta if self.dora_axis == 1 else delta.T)
        self.relora_merged[name].append((A, B))

    def merge_and_reinit(self, name: str, rng) -> None:
        """Merge s B A into W, then A, B ← LoRA's initial factors (B A = 0)."""
        if name in self.merged_adapters:
            raise ValueError(f"ReLoRA adapter {name!r} is merged; unmerge it before training on")
        A, B = self.factors(name)
        self.absorb(name, A.data.copy(), B.data.copy())
        for p, value in zip((A, B), self.initial_factors(name, True, rng)):
            p.data = to_device(np.asarray(value, dtype=p.dtype), p.device)


class ReLoraLinear(ReLoraLayer, LoraLinear):
    pass


class ReLoraEmbedding(ReLoraLayer, LoraEmbedding):
    pass


def adapter_layers(model, name: str) -> list[tuple[str, ReLoraLayer]]:
    """(path, layer) for the ReLoRA layers of ``model`` (the bare model) holding adapter ``name``."""
    return layers_holding(model, name, ReLoraLayer)


def apply(model, config: ReLoraConfig, rng, adapter_name: str = "default"):
    """LoRA's apply with ReLoRA's layers; a tied target weight is refused (restarts write W)."""
    try:
        refuse_tied(model, targeting.find_targets(model, config, (Linear, Embedding, lora.LoraLayer), "ReLoRA"),
                    "ReLoRA merges at every restart into")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return lora.apply(model, config, rng, adapter_name, classes=(ReLoraLinear, ReLoraEmbedding),
                      group_prefix="relora")


def is_restart(step: int, reset_every: int) -> bool:
    """After update ``step`` (0-based) ReLoRA merges, re-initialises and prunes."""
    return step >= reset_every and step % reset_every == 0


def magnitude_mask(x, ratio: float):
    """True at the round((1 − ratio)·n) entries of x with the largest |value| (ties: first in flat order)."""
    xp, flat = get_array_module(x), x.reshape(-1)
    keep = xp.zeros(flat.shape, dtype=bool)
    keep[xp.argsort(-xp.abs(flat), kind="stable")[:int(round((1.0 - ratio) * flat.size))]] = True
    return keep.reshape(x.shape)


def prune_optimizer_state(optimizer, params, ratio: float) -> None:
    """Keep, for each of ``params``, the entries of its first moment array (AdamW's m, SGD's
    momentum) with the largest |value|, and the same entries of the others (AdamW's v); zero
    the rest, in place."""
    pruned = set()
    for p in params:
        state = optimizer.state_for(p)  # None before its first update or outside the optimizer
        if state and optimizer.state_arrays and id(p) not in pruned:
            pruned.add(id(p))  # a parameter listed twice is pruned once
            keep = magnitude_mask(state[optimizer.state_arrays[0]], ratio)
            for key in optimizer.state_arrays:
                state[key] *= keep


# ----- hooks the trainer calls through PeftModel ------------------------------------------
def on_step_end(peft_model, name: str, step: int) -> None:
    if is_restart(step, peft_model.peft_config[name].reset_every):
        for _, layer in adapter_layers(peft_model.get_base_model(), name):
            layer.merge_and_reinit(name, peft_model.rng)


def edit_optimizer_state(peft_model, name: str, step: int, optimizer) -> None:
    config = peft_model.peft_config[name]
    if is_restart(step, config.reset_every):
        params = [p for _, layer in adapter_layers(peft_model.get_base_model(), name) for p in layer.factors(name)]
        prune_optimizer_state(optimizer, params, config.prune_ratio)


def accumulated_delta(layer: ReLoraLayer, name: str) -> np.ndarray:
    """Σ_j s B_j A_j + s B A in float64, (out, in) ((dim, num) for an embedding): W_now + s B A − W₀."""
    A, B = layer.factors(name)
    As, Bs = zip(*layer.relora_merged[name], (A.data, B.data))
    return layer.scaling[name] * (np.concatenate([to_numpy(b).astype(np.float64) for b in Bs], axis=1)
                                  @ np.concatenate([to_numpy(a).astype(np.float64) for a in As]))


def accumulated_delta_rank(model, adapter_name: str = "default", tol: float | None = None) -> dict[str, int]:
    """Module path -> numerical rank of its total ReLoRA update (``numpy.linalg.matrix_rank``,
    default tolerance σ_max · max(out, in) · eps of float64)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {path: int(np.linalg.matrix_rank(accumulated_delta(layer, adapter_name), tol=tol))
            for path, layer in adapter_layers(base, adapter_name)}


# ----- the merged updates on disk -----------------------------------------------------------
def save_extra(peft_model, name: str, folder) -> None:
    """Write relora_merged.safetensors: the factors merged at each restart (none yet: an empty file)."""
    tensors = {}
    for path, layer in adapter_layers(peft_model.get_base_model(), name):
        if merged := layer.relora_merged[name]:
            tensors[f"{PREFIX}{path}.relora_merged_A"] = np.concatenate([to_numpy(a) for a, _ in merged])  # (k·r, in)
            tensors[f"{PREFIX}{path}.relora_merged_B"] = np.concatenate([to_numpy(b) for _, b in merged], axis=1)
    # written even before the first restart (then empty), so that a missing file means a
    # lost one, which load_extra refuses, rather than "no restarts"
    write_safetensors(folder / MERGED_NAME, tensors, metadata={"format": "pt"})


def load_extra(peft_model, name: str, folder) -> None:
    """Replay the saved merges on the base weights, every key and shape checked first. A layer
    that already holds exactly these merges (a resume in the same process) is left alone."""
    path = folder / MERGED_NAME
    if not path.is_file():  # without it, the adapter would load onto W₀ alone: another model
        raise CheckpointError(f"ReLoRA adapter folder '{folder}' has no {MERGED_NAME} (the updates merged into "
                              "the weights at each restart); it cannot be loaded without it")
    tensors, plans, expected = read_safetensors(path), [], set()
    for module, layer in adapter_layers(peft_model.get_base_model(), name):
        (r, n_in), n_out = layer.factors(name)[0].shape, layer.factors(name)[1].shape[0]
        keys = (f"{PREFIX}{module}.relora_merged_A", f"{PREFIX}{module}.relora_merged_B")
        mA, mB = (np.asarray(tensors[key], dtype=layer.factors(name)[0].dtype) if key in tensors else None
                  for key in keys)
        k = 0 if mA is None else mA.shape[0] // r
        if (mA is None) != (mB is None) or mA is not None and (
                k == 0 or mA.shape != (k * r, n_in) or mB.shape != (n_out, k * r)):
            raise CheckpointError(f"'{path}': {module} needs merged factors of shapes (k·{r}, {n_in}) and "
                                  f"({n_out}, k·{r}), k >= 1")
        expected.update(keys if k else ())
        pairs = [(np.ascontiguousarray(mA[j * r:(j + 1) * r]), np.ascontiguousarray(mB[:, j * r:(j + 1) * r]))
                 for j in range(k)]  # contiguous, as the parameters were when they were merged
        held = layer.relora_merged[name]
        if held and not (len(held) == k and all(np.array_equal(to_numpy(a), x) and np.array_equal(to_numpy(b), y)
                                                for (a, b), (x, y) in zip(held, pairs))):
            raise CheckpointError(f"'{path}': {module} already holds other ReLoRA merges than the file; "
                                  "load ReLoRA state into a fresh base model")
        plans.append((layer, [] if held else pairs))
    if unexpected := sorted(set(tensors) - expected):
        raise CheckpointError(f"'{path}' does not fit the model: unexpected keys {unexpected[:5]}")
    for layer, pairs in plans:  # everything checked: replay W ← W + s B_j A_j in order
        device = layer.base_layer.weight.device
        for a, b in pairs:
            layer.absorb(name, to_device(a, device), to_device(b, device))


# ----- the method's row in the table, and its command line ---------------------------------
def cli_config(args) -> ReLoraConfig:
    return ReLoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=targeting.parse_targets(args.target), reset_every=args.relora_every,
                        prune_ratio=args.relora_prune)


def cli_report(peft_model, args, eval_loss) -> None:
    ranks = accumulated_delta_rank(peft_model)
    restarts = len(adapter_layers(peft_model.get_base_model(), "default")[0][1].relora_merged["default"])
    print(f"relora: {restarts} restarts; rank of the total update W - W0 per module: "
          f"min {min(ranks.values())}, max {max(ranks.values())} (r = {args.r})")


RELORA_EVERY = CliOption(("--relora-every",), dict(
    type=int, default=50, help="merge, re-init and prune the optimizer every this many steps (default 50)"))
CLI_OPTIONS = (
    RELORA_EVERY,
    CliOption(("--relora-prune",), dict(type=float, default=0.99,
                                        help="share of the optimizer moments zeroed at a restart (default 0.99)")),
)

METHOD = PeftMethod(
    "RELORA", ReLoraConfig, apply, ReLoraLayer, "relora", default_target_modules=("q_proj", "v_proj"),
    on_step_end=on_step_end, edit_optimizer_state=edit_optimizer_state, save_extra=save_extra,
    load_extra=load_extra,
    cli=CliSpec({"relora": cli_config}, (R, ALPHA, DROPOUT, TARGET) + CLI_OPTIONS,
                "ReLoRA (also uses --r, --alpha, --dropout, --target; LR: --schedule jagged_cosine)", cli_report))
