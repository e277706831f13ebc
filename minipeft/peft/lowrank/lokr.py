"""LoKr: low-rank Kronecker-product adaptation, from LyCORIS (Yeh et al., 2024, "Navigating
Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", arXiv:2309.14859,
§3.1; the Kronecker idea from Edalati et al., 2022, KronA, arXiv:2212.10650), as Hugging Face
PEFT 0.21 runs it (peft/tuners/lokr/, itself a copy of KohakuBlueleaf/LyCORIS lycoris/modules/lokr.py).

A targeted Linear, W of shape (out, in), frozen, with out = a·b and in = c·d split by
``factorization`` below ((a, b) = factorization(out), (c, d) = factorization(in)), becomes

    y = x Wᵀ + b + x ΔWᵀ,     ΔW = s · (W1 ⊗ W2)           W1: (a, c),  W2: (b, d),  s = alpha / r
    W1 = W1a W1b  (a, r)(r, c)   only with decompose_both and r < max(a, c) / 2, else W1 is stored whole
    W2 = W2a W2b  (b, r)(r, d)   when r < max(b, d) / 2, else W2 is stored whole

(W1 ⊗ W2)[i·b + k, j·d + l] = W1[i, j] W2[k, l], so ΔW is (a·b, c·d) = (out, in) with no reshape.
The forward never forms ΔW: with X = x reshaped to (…, c, d), the identity
(W1 ⊗ W2) vec_r(X) = vec_r(W1 X W2ᵀ) gives x ΔWᵀ = s · reshape(W1 X W2ᵀ, (…, out)), which costs
O(a·c·d + a·b·d) per token instead of O(out·in) (tests/peft/lowrank/test_lokr.py checks the two agree).

Training-time noise, both off by default (PEFT's 0): rank_dropout zeroes each output row of ΔW
with probability p, one mask per forward over the out axis (÷ its mean with rank_dropout_scale;
no 1/(1 − p) otherwise, as PEFT); module_dropout skips the whole adapter with probability p.

Parameters per Linear: (a·c if W1 whole else r·(a + c)) + (b·d if W2 whole else r·(b + d)).
r and alpha per layer come from rank_pattern / alpha_pattern.

Identity at init: init_weights=True sets W1 = 0 (W1a = 0 when W1 is low-rank), the others
kaiming-uniform(a=√5) = U(±1/√fan_in), so ΔW = 0; "lycoris" sets W2 = 0 (W2b = 0) and draws
W1, so ΔW = 0 again; False draws every factor (not the identity, for tests).

Merge: W ← W + s (W1 ⊗ W2); unmerge: W ← W − s (W1 ⊗ W2) (one rounding each way).

Departures from PEFT: Linear layers only (LLaMA has no Conv; use_effective_conv2d is kept and
written but, as in PEFT for Linear, has no effect); decompose_factor must be -1 or positive (PEFT
treats 0 and other negatives as "no split": (1, dim)); rank_dropout with rank_dropout_scale on a
mask that drops every row gives ΔW = 0 (PEFT divides by a zero mean: NaN); random draws use
NumPy's generator (same distributions as torch, different numbers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ...autograd import no_grad, ops
from ...autograd.fused import linear
from ...backend import get_array_module, to_device
from ...nn import Linear, Parameter, ParameterGroup, init
from ..core import targeting
from ..core.base import AdapterLayer, ParameterDict
from ..core.config import PeftConfig, _is_int, _is_number
from ..core.method import CliOption, CliSpec, PeftMethod
from .lora import ALPHA, R, TARGET

INITS = (True, False, "lycoris")
DEFAULT_TARGETS = ("q_proj", "v_proj")  # peft/utils/constants.py, "llama"
FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of ``dimension`` into m·n: (factor, dimension // factor) when ``factor``
    divides it (in that order); otherwise the divisor pair closest to √dimension with m ≤ factor
    (-1: no bound), smaller first. 128 → (8, 16), 127 → (1, 127), (128, 4) → (4, 32), (128, 32) → (32, 4)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:  # walk the divisors up to √dimension (and one past it: the mirror pair), m ≤ bound
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        if new_m > bound:
            break
        m, n = new_m, dimension // new_m
    return (m, n) if m <= n else (n, m)


@dataclass(frozen=True)
class LoKrConfig(PeftConfig):
    peft_type: ClassVar[str] = "LOKR"

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False  # Conv layers only in PEFT; no effect on Linear
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        self._require("r", _is_int(self.r) and self.r > 0, "must be a positive integer")
        self._require("alpha", _is_number(self.alpha), "must be a number")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            self._require(name, _is_number(value) and 0 <= value < 1, "must lie in [0, 1)")
        for name in ("use_effective_conv2d", "decompose_both", "rank_dropout_scale"):
            self._require(name, isinstance(getattr(self, name), bool), "must be true or false")
        self._require("decompose_factor", _is_int(self.decompose_factor) and (self.decompose_factor == -1 or
                                                                              self.decompose_factor > 0),
                      "must be -1 (split near the square root) or a positive integer")
        self._require("init_weights", any(self.init_weights is v or isinstance(v, str) and self.init_weights == v
                                          for v in INITS), f"must be one of {INITS}")
        for name, ok in (("rank_pattern", lambda v: _is_int(v) and v > 0), ("alpha_pattern", _is_number)):
            pattern = {} if getattr(self, name) is None else getattr(self, name)
            self._require(name, isinstance(pattern, dict) and all(isinstance(k, str) and ok(v)
                                                                  for k, v in pattern.items()),
                          "must map regex strings to " + ("positive ranks" if name[0] == "r" else "numbers"))
            self._set(name, dict(pattern))


class LoKrLinear(AdapterLayer):
    """A Linear plus, per adapter, the Kronecker factors W1 (or W1a, W1b) and W2 (or W2a, W2b)."""

    def __init__(self, base_layer: Linear, rng):
        super().__init__(base_layer)
        self.r, self.alpha, self.scaling, self.shape = {}, {}, {}, {}  # shape: ((a, b), (c, d))
        self.rank_dropout, self.rank_dropout_scale, self.module_dropout = {}, {}, {}
        for table in FACTORS:  # PEFT's names: lokr_w1.default, ...; absent entries are not used
            setattr(self, table, ParameterDict())
        self.rng = rng  # numpy Generator for the dropout masks, shared with the PeftModel

    def update_layer(self, name: str, r: int, alpha, config: LoKrConfig, rng) -> None:
        out, inp = self.base_layer.weight.shape
        (a, b), (c, d) = factorization(out, config.decompose_factor), factorization(inp, config.decompose_factor)
        self.r[name], self.alpha[name], self.scaling[name], self.shape[name] = r, alpha, alpha / r, ((a, b), (c, d))
        self.rank_dropout[name], self.module_dropout[name] = float(config.rank_dropout), float(config.module_dropout)
        self.rank_dropout_scale[name] = config.rank_dropout_scale
        whole_w1 = not (config.decompose_both and r < max(a, c) / 2)
        whole_w2 = not r < max(b, d) / 2
        how = config.init_weights
        # what starts at zero: W1 (or W1a) by default, W2 (or W2b) with "lycoris", nothing with False
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(how, ()) if how else ()
        shapes = ({"lokr_w1": (a, c)} if whole_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}) | \
                 ({"lokr_w2": (b, d)} if whole_w2 else {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)})
        weight = self.base_layer.weight
        for table, shape in shapes.items():
            value = np.zeros(shape) if table in zero else init.kaiming_uniform(shape, rng, dtype=np.float64)
            getattr(self, table)[name] = Parameter(to_device(value.astype(weight.dtype), weight.device))

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def adapter_state(self, name: str) -> dict:
        # file keys ...q_proj.lokr_w1 (adapter name removed), as PEFT
        return {table: getattr(self, table)[name] for table in FACTORS if name in getattr(self, table)}

    def delete_adapter(self, name: str) -> None:
        for table in (self.r, self.alpha, self.scaling, self.shape, self.rank_dropout, self.rank_dropout_scale,
                      self.module_dropout, *(getattr(self, t) for t in FACTORS)):
            if name in table:
                del table[name]

    def kron_factors(self, name: str):
        """(W1, W2) as Tensors: stored whole, or the product of their low-rank halves."""
        def whole(key):
            table = getattr(self, key)
            return table[name] if name in table else getattr(self, key + "_a")[name] @ getattr(self, key + "_b")[name]
        return whole("lokr_w1"), whole("lokr_w2")

    def delta_weight(self, name: str):
        """ΔW = s · (W1 ⊗ W2), shape (a·b, c·d) = (out, in): the equation, once."""
        with no_grad():
            W1, W2 = self.kron_factors(name)
        return self.scaling[name] * get_array_module(W1.data).kron(W1.data, W2.data)

    def merge_into(self, name, weight):
        return weight + self.delta_weight(name)

    def unmerge_from(self, name, weight, keep=False):
        return weight - self.delta_weight(name)

    # ----- forward: x ΔWᵀ by the Kronecker identity, ΔW never formed --------------------------
    def adapter_forward(self, name, x, result):
        if self.training and self.module_dropout[name] > 0 and self.rng.random() <= self.module_dropout[name]:
            return result  # module dropout: PEFT applies the adapter when rand > p
        return result + self.kron_branch(name, x)

    def kron_branch(self, name, x):
        """s · reshape(W1 X W2ᵀ, (…, out)) with X = x reshaped to (…, c, d): equal to x ΔWᵀ."""
        W1, W2 = self.kron_factors(name)
        ((a, b), (c, d)), lead = self.shape[name], x.shape[:-1]
        X = x.reshape(*lead, c, d)
        W1X = ops.swapaxes(linear(ops.swapaxes(X, -1, -2), W1), -1, -2)  # (…, a, d) = W1 X
        y = linear(W1X, W2).reshape(*lead, a * b) * self.scaling[name]  # (…, a, b) = W1 X W2ᵀ, then (…, out)
        if self.training and self.rank_dropout[name] > 0:  # drop rows of ΔW = entries of y's out axis
            keep = (self.rng.random(a * b) > self.rank_dropout[name]).astype(np.float64)
            if self.rank_dropout_scale[name] and keep.any():
                keep /= keep.mean()
            y = y * to_device(keep.astype(y.dtype), self.base_layer.weight.device)
        return y


def apply(model, config: LoKrConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """Wrap every Linear ``config`` targets in a LoKr layer (or add an adapter to one already
    wrapped) and return the new factors as the group ``lokr:<adapter_name>``."""
    config = targeting.resolve_target_modules(model, config, DEFAULT_TARGETS)  # None: PEFT's LLaMA default
    names = targeting.find_targets(model, config, (Linear, LoKrLinear), "LoKr")
    params = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoKrLinear):
            layer = LoKrLinear(layer, rng)
            layer.active_adapters = [adapter_name]  # a new layer runs its first adapter (PeftModel may change it)
            model.set_submodule(name, layer)
        r = targeting.pattern_value(config.rank_pattern, name, config.r)
        alpha = targeting.pattern_value(config.alpha_pattern, name, config.alpha)
        layer.update_layer(adapter_name, r, alpha, config, rng)
        params.extend(layer.adapter_state(adapter_name).values())
    return ParameterGroup(f"lokr:{adapter_name}", params)


# ----- the method's row in the table, and its command line ---------------------------------
DECOMPOSE_FACTOR = CliOption(("--lokr-decompose-factor",), dict(
    type=int, default=-1, help="split each dimension as (f, dim / f) when f divides it "
                               "(default -1: the divisor pair nearest its square root)"))


def cli_config(args) -> LoKrConfig:
    return LoKrConfig(r=args.r, alpha=args.alpha, target_modules=targeting.parse_targets(args.target),
                      decompose_factor=args.lokr_decompose_factor)


METHOD = PeftMethod(
    "LOKR", LoKrConfig, apply, LoKrLinear, "lokr", default_target_modules=DEFAULT_TARGETS,
    cli=CliSpec({"lokr": cli_config}, (R, ALPHA, TARGET, DECOMPOSE_FACTOR), "LoKr (uses --r, --alpha, --target)"))
