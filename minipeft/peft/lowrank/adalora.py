"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang et al., 2023,
arXiv:2303.10512), as Hugging Face PEFT 0.21 implements it (REFERENCE 1.8). The rank
allocator, the schedule and the importance scores are in adalora_allocator.py.

A targeted Linear, W of shape (out, in), frozen, gets an update in SVD form (eq. 3):

    ΔW = P Λ Q · c,     c = lora_alpha / (ranknum + 1e-5)
    P = lora_B: (out, r)   Λ = diag(lora_E), lora_E: (r, 1)   Q = lora_A: (r, in)
    y = x Wᵀ + b + c · (dropout(x) (Q ⊙ E)ᵀ) Pᵀ       (Q ⊙ E: row i of Q scaled by E_i)

r = init_r, and ranknum = init_r is a frozen number that never changes (PEFT keeps it so the
scale survives pruning: c stays α / init_r while ranks are masked). With lora_alpha ≤ 0 PEFT
uses α = r. The rank allocator sets E_i = 0 for the least important triplets (P_·i, E_i, Q_i·)
during training (adalora_allocator.py), and the training loss gets the orthogonal regulariser
(eq. 4, PEFT's unsquared norm, mean over every P and Q of the adapter):

    loss ← loss + orth_reg_weight · mean_{M ∈ {Q's, P's}} ‖M Mᵀ − I‖_F   (Q Qᵀ, Pᵀ P: (r, r))

Parameters: r·(in + out + 1) trainable per targeted Linear (Q, P, Λ), plus ranknum, one
frozen number per layer that PEFT counts in "all params".
Identity at init: E = 0, so ΔW = 0 exactly; Q, P ~ N(0, 0.02²). With init_lora_weights=False
Q, E, P ~ N(0, 1) (torch.randn), not the identity.
Merge: W ← W + ΔW; unmerge: W ← W − ΔW (exact up to one rounding each way).
Files (PEFT's layout): ``...q_proj.lora_A`` / ``lora_E`` / ``lora_B`` (no ``.weight``), ranknum
not saved; once ranks were allocated, adapter_config.json holds ``rank_pattern`` (module
``…q_proj.lora_E`` → one bool per rank) and A, E, B are saved cropped to the kept ranks.
Loading builds each layer with the kept ranks, ranknum still init_r (PEFT's resize on load).
While ranks are still being allocated, ``adalora_importance.safetensors`` (the allocator's
averages, which PEFT ignores) is saved beside them, so a resumed training checkpoint
continues exactly (the registry's save_extra / load_extra).

Departures from PEFT: Linear layers only (PEFT also adapts Conv1D, Conv2d and quantised
layers); random inits use NumPy's generator (same distributions, other numbers); the
regulariser is the ``regularizer`` hook the trainer adds to the *training* loss (PEFT adds it
inside forward whenever labels are given, so its eval losses include it; ours are pure
cross-entropy); ``r``, ``use_rslora`` and ``alpha_pattern`` are accepted and ignored, as
PEFT ignores them for AdaLoRA. Allocator departures: see adalora_allocator.py.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...autograd import ops
from ...autograd.fused import linear
from ...backend import get_array_module, to_device, to_numpy
from ...errors import ConfigError
from ...nn import Linear, Parameter, ParameterGroup, init
from . import adalora_allocator as allocator
from ..core import targeting
from ..core.base import AdapterLayer, ParameterDict
from ..core.config import PeftConfig, _is_int, _is_number
from ..core.method import CliOption, CliSpec, PeftMethod
from ..core.names import PREFIX
from .lora import ALPHA, DROPOUT, TARGET, LoraConfig


@dataclass(frozen=True)
class AdaLoraConfig(PeftConfig):
    peft_type: ClassVar[str] = "ADALORA"
    PEFT_FIXED: ClassVar[dict] = {**LoraConfig.PEFT_FIXED, "use_rslora": False, "alpha_pattern": {}}
    PEFT_INERT: ClassVar[frozenset] = LoraConfig.PEFT_INERT | {"use_rslora", "alpha_pattern"}

    target_r: int = 8  # average rank the budget ends at
    init_r: int = 12  # rank every layer starts with
    tinit: int = 0  # steps before the budget starts to fall
    tfinal: int = 0  # steps at the end with the final mask fixed
    deltaT: int = 1  # mask every deltaT steps while the budget falls
    beta1: float = 0.85  # EMA of the sensitivity I
    beta2: float = 0.85  # EMA of the uncertainty |I − Ī|
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # T, required
    rank_pattern: dict | None = None  # "model.layers.0.self_attn.q_proj.lora_E" -> (kept?, ...)
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    bias: str = "none"
    use_dora: bool = False
    r: int = 8  # PEFT's LoraConfig field; AdaLoRA ignores it (init_r is the rank)

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_r", "tinit", "tfinal"):
            self._require(name, _is_int(getattr(self, name)) and getattr(self, name) >= 0,
                          "must be a non-negative integer")
        for name in ("init_r", "deltaT", "total_step"):
            self._require(name, _is_int(getattr(self, name)) and getattr(self, name) > 0,
                          "must be a positive integer (AdaLoRA needs total_step, the number of training steps)"
                          if name == "total_step" else "must be a positive integer")
        self._require("tinit", self.tinit < self.total_step - self.tfinal,
                      f"must be below total_step - tfinal = {self.total_step - self.tfinal}, or no step is left "
                      "to allocate ranks in")
        for name in ("beta1", "beta2"):
            self._require(name, _is_number(getattr(self, name)) and 0 < getattr(self, name) < 1, "must lie in (0, 1)")
        self._require("orth_reg_weight", _is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0,
                      "must be a number >= 0")
        self._require("lora_alpha", _is_number(self.lora_alpha), "must be a number")
        self._require("lora_dropout", _is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
                      "must lie in [0, 1)")
        self._require("init_lora_weights", isinstance(self.init_lora_weights, bool), "must be true or false")
        self._require("bias", self.bias in ("none", "all", "lora_only"), "must be 'none', 'all' or 'lora_only'")
        self._require("use_dora", self.use_dora is False, "must be false: AdaLoRA does not support DoRA (as in PEFT)")
        self._require("r", _is_int(self.r), "must be an integer")
        if self.r != 8:
            warnings.warn("AdaLoraConfig: r is not used by AdaLoRA and is ignored; init_r is the initial rank",
                          stacklevel=3)
        pattern = self.rank_pattern
        self._require("rank_pattern", pattern is None or isinstance(pattern, dict) and all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(b in (True, False) for b in v)
            for k, v in pattern.items()), "must map module names to lists of booleans (one per rank)")
        if pattern is not None:  # keys as PEFT saves them: "<module>.lora_E", the adapter name dropped
            self._set("rank_pattern", {k.split(".lora_E")[0] + ".lora_E": tuple(bool(b) for b in v)
                                       for k, v in pattern.items()})

    def for_loading(self) -> "AdaLoraConfig":
        return LoadedAdaLoraConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class LoadedAdaLoraConfig(AdaLoraConfig):
    """The config apply() builds a *loaded* adapter with: each layer with rank_pattern's kept
    ranks, the shapes of the saved (cropped) tensors, as PEFT resizes layers on load."""


class AdaLoraLayer(AdapterLayer):
    """PEFT's SVDLinear: a Linear with adapters ΔW = P Λ Q · c."""

    def __init__(self, base_layer: Linear, rng):
        super().__init__(base_layer)
        self.lora_A = ParameterDict()  # Q: (r, in)
        self.lora_B = ParameterDict()  # P: (out, r)
        self.lora_E = ParameterDict()  # Λ: (r, 1)
        self.ranknum = ParameterDict()  # (1,) = init_r, frozen, not saved
        self.r, self.lora_alpha, self.scaling, self.lora_dropout = {}, {}, {}, {}
        self.c = {}  # adapter -> c = α / (ranknum + 1e-5), a float (ranknum never changes)
        self.importance: dict[str, dict] = {}  # adapter -> {"lora_A": (Ī, Ū), ...}: the allocator's EMAs
        self.rng = rng  # numpy Generator for dropout masks, shared with the PeftModel

    def update_layer(self, name, r: int, config: AdaLoraConfig, rng) -> None:
        (out, inp), weight = self.base_layer.weight.shape, self.base_layer.weight
        self.r[name], self.lora_alpha[name] = r, config.lora_alpha
        self.scaling[name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.c[name] = self.scaling[name] / (float(config.init_r) + 1e-5)
        self.lora_dropout[name] = float(config.lora_dropout)
        std = 0.02 if config.init_lora_weights else 1.0
        A = init.normal((r, inp), rng, std=std, dtype=np.float64)
        B = init.normal((out, r), rng, std=std, dtype=np.float64)
        E = np.zeros((r, 1)) if config.init_lora_weights else init.normal((r, 1), rng, dtype=np.float64)
        for table, value, trainable in ((self.lora_A, A, True), (self.lora_B, B, True), (self.lora_E, E, True),
                                        (self.ranknum, np.array([float(config.init_r)]), False)):
            table[name] = Parameter(to_device(value.astype(weight.dtype), weight.device), requires_grad=trainable)

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def factors(self, name):
        """(P, E, Q) = (lora_B, lora_E, lora_A) and c = α / (ranknum + 1e-5)."""
        return self.lora_B[name], self.lora_E[name], self.lora_A[name], self.c[name]

    def delta_weight(self, name: str):
        """ΔW = P (Q ⊙ E) · c, shape (out, in): the equation, once."""
        P, E, Q, c = self.factors(name)
        return (P.data @ (Q.data * E.data)) * c

    def merge_into(self, name, weight):
        return weight + self.delta_weight(name)

    def unmerge_from(self, name, weight, keep=False):
        return weight - self.delta_weight(name)

    def adapter_forward(self, name, x, result):
        """result + c · (dropout(x) (Q ⊙ E)ᵀ) Pᵀ: two thin matmuls, ΔW never formed."""
        P, E, Q, c = self.factors(name)
        if self.r[name] == 0:  # a loaded layer whose every rank was pruned adds nothing
            return result
        x = ops.dropout(x, self.lora_dropout[name], self.rng, training=self.training)
        return result + linear(linear(x, Q * E) * c, P)

    def adapter_state(self, name: str) -> dict:
        return {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name], "lora_E": self.lora_E[name]}

    def delete_adapter(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_E, self.ranknum):
            if name in table:
                del table[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.c, self.importance):
            table.pop(name, None)


def apply(model, config: AdaLoraConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """Wrap every Linear ``config`` targets in an AdaLoRA layer of rank init_r (a loaded adapter:
    rank_pattern's kept ranks) and return Q, E, P as the group ``adalora:<adapter_name>``."""
    names = targeting.find_targets(model, config, (Linear, AdaLoraLayer), "AdaLoRA")
    loading = isinstance(config, LoadedAdaLoraConfig)  # module path -> kept ranks (keys as PEFT saves or holds them)
    kept = {k.split(".lora_E")[0]: sum(v) for k, v in (config.rank_pattern or {}).items()} if loading else {}
    params = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, AdaLoraLayer):
            layer = AdaLoraLayer(layer, rng)
            layer.active_adapters = [adapter_name]  # a new layer runs its first adapter (PeftModel may change it)
            model.set_submodule(name, layer)
        layer.update_layer(adapter_name, kept.get(name, config.init_r), config, rng)
        params.extend(layer.adapter_state(adapter_name).values())
    return ParameterGroup(f"adalora:{adapter_name}", params)


# ----- hooks the trainer reaches through PeftModel (registry.py) ------------------------------
def regularizer(peft_model, name: str):
    """orth_reg_weight · mean over every Q and P of ‖M Mᵀ − I‖_F (a Tensor; None when the weight is 0)."""
    weight = peft_model.peft_config[name].orth_reg_weight
    if weight == 0:
        return None
    terms, count = [], 0
    for _, layer in allocator.adapted_layers(peft_model, name):
        for M in (layer.lora_A[name], ops.transpose(layer.lora_B[name])):  # Q (r, in), Pᵀ (r, out)
            count += 1  # a pruned-to-rank-0 matrix counts, with norm 0, as in PEFT
            if M.shape[0]:
                gram = M @ ops.transpose(M) - get_array_module(M.data).eye(M.shape[0], dtype=M.dtype)  # (r, r)
                terms.append(ops.sqrt(ops.sum(gram * gram)))
    return None if not terms else sum(terms[1:], terms[0]) * (weight / count)


def on_step_end(peft_model, name: str, step: int) -> None:
    """After the optimizer step, before zero_grad: PEFT's ``update_and_allocate(step)``."""
    allocator.update_and_allocate(peft_model, name, step)


save_extra = allocator.save_state  # beside PEFT's two files while allocating: the importance averages
load_extra = allocator.load_state  # on loading / resuming: those averages and the rank_pattern so far


def saved_tensors(peft_model, name: str, tensors: dict) -> dict:
    """The file's arrays with A, E, B cropped to the ranks rank_pattern keeps (PEFT's
    resize_state_dict_by_rank_pattern); a layer already at its kept rank is left as is."""
    out = dict(tensors)
    for key, keep in (peft_model.peft_config[name].rank_pattern or {}).items():
        path, keep = PREFIX + key.split(".lora_E")[0], np.flatnonzero(keep)
        if f"{path}.lora_A" not in out:
            raise ConfigError(f"rank_pattern names {key!r}, but adapter {name!r} has no layer there")
        for part, axis in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            array = to_numpy(out[f"{path}.{part}"])
            if array.shape[axis] != len(keep):
                out[f"{path}.{part}"] = np.ascontiguousarray(np.take(array, keep, axis=axis))
    return out


# ----- the method's row in the table, and its command line ---------------------------------
def cli_config(args) -> AdaLoraConfig:
    return AdaLoraConfig(init_r=args.init_r, target_r=args.target_r, tinit=args.tinit, tfinal=args.tfinal,
                         deltaT=args.delta_t, beta1=args.beta1, beta2=args.beta2, orth_reg_weight=args.orth_reg_weight,
                         total_step=args.steps, lora_alpha=args.alpha, lora_dropout=args.dropout,
                         target_modules=targeting.parse_targets(args.target))


def cli_report(peft_model, args, eval_loss) -> None:
    """The final rank table (stdout) and OUT/adalora_ranks.png (with matplotlib)."""
    from .adalora_plot import report  # noqa: PLC0415 - the plot module imports this one's allocator

    print(report(peft_model, args.out))


CLI_OPTIONS = (
    CliOption(("--init-r",), dict(type=int, default=12, help="initial rank of every module (default 12)")),
    CliOption(("--target-r",), dict(type=int, default=8, help="average rank the budget ends at (default 8)")),
    CliOption(("--tinit",), dict(type=int, default=0, help="steps before ranks are pruned (default 0)")),
    CliOption(("--tfinal",), dict(type=int, default=0, help="last steps with the final ranks fixed (default 0)")),
    CliOption(("--delta-t",), dict(type=int, default=1, help="prune every this many steps (default 1)")),
    CliOption(("--beta1",), dict(type=float, default=0.85, help="EMA of the sensitivity (default 0.85)")),
    CliOption(("--beta2",), dict(type=float, default=0.85, help="EMA of the uncertainty (default 0.85)")),
    CliOption(("--orth-reg-weight",), dict(type=float, default=0.5,
                                           help="orthogonal regulariser weight (default 0.5)")),
)

METHOD = PeftMethod(
    "ADALORA", AdaLoraConfig, apply, AdaLoraLayer, "adalora", default_target_modules=("q_proj", "v_proj"),
    regularizer=regularizer, on_step_end=on_step_end, saved_tensors=saved_tensors, save_extra=save_extra,
    load_extra=load_extra,
    cli=CliSpec({"adalora": cli_config}, (ALPHA, DROPOUT, TARGET) + CLI_OPTIONS,
                "AdaLoRA (also uses --alpha, --dropout, --target; total_step = --steps)", cli_report))
