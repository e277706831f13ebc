"""IA3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv:2205.05638, §3.3), as Hugging Face PEFT 0.21 runs it (peft/tuners/ia3/).

A targeted Linear, W of shape (out, in), bias b (out,) or none, frozen, gets one learned vector l:

    y = (x Wᵀ + b) ⊙ lᵀ        l: (out, 1)   every target not in feedforward_modules (k, v)
    y = (x ⊙ l) Wᵀ + b         l: (1, in)    feed-forward targets (the paper's l_ff, on down_proj)

so the paper's k ⊙ l_k, v ⊙ l_v (eq. in §3.3) scale a projection's output, and l_ff ⊙ γ(W₁x)
scales the input of the MLP's second matrix. The bias is scaled with the output, as PEFT does
(the result of the base layer is multiplied). Several active adapters multiply their vectors.

Parameters: out per non-feed-forward target + in per feed-forward target (plus full copies of
``modules_to_save``). PEFT's LLaMA default: k_proj, v_proj, down_proj with down_proj feed-forward.

Identity at init: init_ia3_weights=True sets l = 1, so y is the base output exactly (x · 1 is
exact in floating point). False draws l ~ N(0, 1) (PEFT's torch.randn): not the identity, for tests.

Merge: W ← diag(l) W, b ← b ⊙ l (non-feed-forward); W ← W diag(l), b unchanged (feed-forward).
With l stored as (out, 1) or (1, in) both are the one broadcast product ``W * l``.
Unmerge divides by l. PEFT divides by l + 1e-8, which is l itself in float32 for |l| > 0.2 but
distorts W for small l and destroys it where l = 0; here entries that merging turned into 0
(l = 0, or an underflow) are kept aside at merge time and put back, every other entry is
W · l / l, within 2 ulp of W.

Departures from PEFT: fan_in_fan_out must be false (LLaMA's layers are Linear, W (out, in); PEFT
resets it to False with a warning); layers_to_transform / layers_pattern are refused (PEFT's
IA3Config has neither field, so a file could not carry them); feedforward_modules ⊆
target_modules is checked entry by entry, where an entry is also covered by full target names
ending in ".<entry>" and is then replaced by them (so "all-linear", which resolves to full names,
works and its file passes PEFT's literal check; PEFT skips the check for a string target); a second adapter on a layer must agree with the first on whether it is
feed-forward (PEFT keeps the first's silently, and then cannot load the second's shape); random
init uses NumPy's generator (same distribution, different numbers).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...backend import get_array_module, to_device
from ...errors import ConfigError
from ...nn import Linear, Parameter, ParameterGroup
from ..core import targeting
from ..core.base import AdapterLayer, ParameterDict
from ..core.config import PeftConfig, _names
from ..core.method import CliOption, CliSpec, PeftMethod
from ..lowrank.lora import TARGET

DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")  # peft/utils/constants.py, "llama"
DEFAULT_FEEDFORWARD = ("down_proj",)


@dataclass(frozen=True)
class IA3Config(PeftConfig):
    peft_type: ClassVar[str] = "IA3"

    feedforward_modules: str | tuple[str, ...] | None = None  # None: PEFT's LLaMA default, down_proj
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        self._set("feedforward_modules", _names(self, "feedforward_modules", self.feedforward_modules, sort=True))
        self._require("fan_in_fan_out", self.fan_in_fan_out is False,
                      "must be false: LLaMA's layers are Linear, storing W as (out, in)")
        self._require("init_ia3_weights", isinstance(self.init_ia3_weights, bool), "must be true or false")
        for name in ("layers_to_transform", "layers_pattern"):
            self._require(name, getattr(self, name) is None, "is not a field of PEFT's IA3Config; must be None")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple):  # PEFT checks lists only
            covered = {f: [t for t in targets if t == f or t.endswith("." + f)] for f in ff}
            outside = [f for f, ts in covered.items() if not ts]
            self._require("feedforward_modules", not outside,
                          f"must be a subset of target_modules {list(targets)} (not there: {outside})")
            # a short name under full target names ("all-linear" resolved) becomes those names,
            # so the written file passes PEFT's literal subset check
            expanded = set()
            for f in ff:
                expanded.update([f] if f in targets else covered[f])
            self._set("feedforward_modules", tuple(sorted(expanded)))

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("layers_to_transform", "layers_pattern"):  # not keys of PEFT's IA3Config
            del out[key]
        return out

    def is_feedforward(self, name: str) -> bool:
        """PEFT's rule: a regex string must match the whole module name, a list entry must end it."""
        ff = DEFAULT_FEEDFORWARD if self.feedforward_modules is None else self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, name) is not None
        return any(name.endswith(f) for f in ff)


class IA3Linear(AdapterLayer):
    """A Linear whose output (or, feed-forward, input) is scaled by each active adapter's l."""

    def __init__(self, base_layer: Linear, is_feedforward: bool):
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.ia3_l = ParameterDict()  # l: (1, in) feed-forward, (out, 1) otherwise, as PEFT stores it
        self.lost = {}  # adapter name -> {"weight" / "bias": (indices, values)} that merging zeroed

    def update_layer(self, name: str, config: IA3Config, rng) -> None:
        out, inp = self.base_layer.weight.shape
        shape = (1, inp) if self.is_feedforward else (out, 1)
        l = np.ones(shape) if config.init_ia3_weights else rng.standard_normal(shape)
        weight = self.base_layer.weight
        self.ia3_l[name] = Parameter(to_device(l.astype(weight.dtype), weight.device))

    def adapter_names(self) -> list[str]:
        return self.ia3_l.keys()

    def adapter_state(self, name: str) -> dict:
        return {"ia3_l": self.ia3_l[name]}  # file key ...k_proj.ia3_l (adapter name removed), as PEFT

    def delete_adapter(self, name: str) -> None:
        del self.ia3_l[name]
        self.lost.pop(name, None)

    # ----- forward: the two equations of the docstring -------------------------------------
    def adapter_input(self, name, x):
        return x * self.ia3_l[name] if self.is_feedforward else x  # (…, in) ⊙ (1, in)

    def adapter_forward(self, name, x, result):
        if self.is_feedforward:
            return result
        return result * self.ia3_l[name].reshape(-1)  # (…, out) ⊙ (out,): x Wᵀ + b, both scaled

    # ----- merge: W ← W * l (rows or columns by l's shape), b ← b ⊙ l for output scaling ---
    def merge_into(self, name, weight):
        return self._scale(name, "weight", weight, self.ia3_l[name].data)

    def unmerge_from(self, name, weight, keep=False):
        return self._unscale(name, "weight", weight, self.ia3_l[name].data, keep)

    def merge(self, names: list[str], safe: bool = False) -> None:
        start = len(self.merged_adapters)
        super().merge(names, safe)  # the weight (AdapterLayer: idempotent, safe checks)
        bias = self.base_layer.bias
        if bias is not None and not self.is_feedforward:
            for name in self.merged_adapters[start:]:
                bias.data = self._scale(name, "bias", bias.data, self.ia3_l[name].data.reshape(-1))

    def unmerge(self) -> None:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        while self.merged_adapters:  # last merged first
            name = self.merged_adapters.pop()
            weight.data = self.unmerge_from(name, weight.data)
            if bias is not None and not self.is_feedforward:
                bias.data = self._unscale(name, "bias", bias.data, self.ia3_l[name].data.reshape(-1))
        self.lost.clear()

    def _scale(self, name, what, array, l):
        """array ⊙ l, remembering the entries the product zeroed (division cannot bring them back)."""
        xp = get_array_module(array)
        scaled = array * l
        lost = xp.nonzero((scaled == 0) & (array != 0))
        self.lost.setdefault(name, {})[what] = (lost, array[lost])
        return scaled

    def _unscale(self, name, what, array, l, keep=False):
        xp = get_array_module(array)
        out = array / xp.where(l == 0, 1, l).astype(array.dtype)
        saved = self.lost.get(name, {})
        if what in saved:
            lost, values = saved[what] if keep else saved.pop(what)
            out[lost] = values
        return out


def apply(model, config: IA3Config, rng, adapter_name: str = "default") -> ParameterGroup:
    """Wrap every Linear ``config`` targets in an IA3 layer (or add an adapter to one already
    wrapped) and return the vectors l as the group ``ia3:<adapter_name>``."""
    names = targeting.find_targets(model, config, (Linear, IA3Linear), "IA3")
    for name in names:  # checked before anything changes
        layer = model.get_submodule(name)
        if isinstance(layer, IA3Linear) and layer.is_feedforward != config.is_feedforward(name):
            raise ConfigError(f"feedforward_modules: {name} is {'' if layer.is_feedforward else 'not '}feed-forward "
                              f"for adapters {layer.adapter_names()} but would {'not ' * layer.is_feedforward}be "
                              f"for {adapter_name!r}; an IA3 layer scales either its input or its output")
    params = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(layer, config.is_feedforward(name))
            layer.active_adapters = [adapter_name]  # a new layer runs its first adapter (PeftModel may change it)
            model.set_submodule(name, layer)
        layer.update_layer(adapter_name, config, rng)
        params.append(layer.ia3_l[adapter_name])
    return ParameterGroup(f"ia3:{adapter_name}", params)


# ----- the method's row in the table, and its command line ---------------------------------
FEEDFORWARD = CliOption(("--ia3-feedforward",), dict(
    default=None, help="comma-separated target modules whose input IA3 scales (default: PEFT's, down_proj)"))


def cli_config(args) -> IA3Config:
    return IA3Config(target_modules=targeting.parse_targets(args.target),
                     feedforward_modules=targeting.parse_targets(args.ia3_feedforward))


METHOD = PeftMethod(
    "IA3", IA3Config, apply, IA3Linear, "ia3", default_target_modules=DEFAULT_TARGETS,
    cli=CliSpec({"ia3": cli_config}, (TARGET, FEEDFORWARD), "IA3 (uses --target)"))
