"""BitFit: train only bias terms (Ben Zaken, Ravfogel & Goldberg, 2022, "BitFit: Simple
Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", arXiv:2106.10199),
in Hugging Face PEFT 0.21's layout for it, the BEFT tuner (peft/tuners/beft/; arXiv:2509.15974).

BitFit freezes every weight matrix and trains the biases b (§3.1: y = W x + b, b trained). A
LLaMA's Linears have no bias, so, as PEFT's BEFT does, each targeted Linear, W of shape
(out, in) and base bias b₀ (out,) or none, gets a new bias b, zero at init:

    y = x Wᵀ (+ b₀) + b            b: stored (1, out) as PEFT's ``beft_bias``

in memory ``...v_proj.beft_bias.default``, on disk ``...v_proj.beft_bias``. Several active
adapters add their b. ``bias`` chooses which *existing* biases train with it (a Qwen2 model has
b₀ on q/k/v): "beft_only" (default) those of the targeted layers, as BitFit trains a model's own
biases; "all" every bias of the model (the paper's setting); "none" none (PEFT's BEFT). They are
saved as LoRA's bias="lora_only" saves them: ``...v_proj.base_layer.bias``.

Parameters: out per targeted Linear (+ the sizes of the existing biases ``bias`` trains).
PEFT's default target for LLaMA: v_proj.

Identity at init: b = 0, so y is the base output exactly (adding 0.0 is exact). init_weights=False
draws b ~ N(0, 1) (PEFT's torch.randn): not the identity, for tests.

Merge: b₀ ← b₀ + b, with b₀ = 0 where the Linear has none; W is untouched. Unmerge puts back the
b₀ saved at merge (exact; PEFT subtracts), or removes a b₀ the merge created. Inside a PeftModel a
created b₀ is a plain tensor, not a parameter (the model's parameters stay those it had);
``merge_and_unload`` makes it one (:func:`declare_merged_biases`) and declares it in the model's
config: LlamaConfig's ``attention_bias`` covers q, k, v, o and ``mlp_bias`` gate, up, down, so
the group's other Linears get zero biases; a qwen2 / mistral config, which cannot declare them,
becomes the equivalent llama one. ``save_pretrained`` then writes a folder transformers loads.

Departures from PEFT: ``bias`` is not a PEFT field: a file without it means "none", and it is
written only when not "none", resolved against the model when the adapter is added (a model
without such biases stores "none"), so an adapter of a bias-free LLaMA is exactly PEFT's file;
PEFT refuses to merge into a Linear without a bias, here one is created (above); targets must be
attention / MLP projections (transformers' LLaMA has no output-head bias to merge into);
exclude_modules / layers_to_transform / layers_pattern are refused (PEFT's BeftConfig has none of
them); random init uses NumPy's generator (same distribution, different numbers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...autograd.tensor import Tensor
from ...backend import get_array_module, to_device
from ...errors import ConfigError
from ...nn import Linear, Parameter, ParameterGroup
from ..core import targeting
from ..core.base import AdapterLayer, ParameterDict
from ..core.config import PeftConfig
from ..core.method import CliSpec, PeftMethod
from ..lowrank.lora import TARGET

DEFAULT_TARGETS = ("v_proj",)  # peft/utils/constants.py, TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING["llama"]
BIAS = ("none", "beft_only", "all")
# the LlamaConfig flag that declares each projection's bias (transformers' LLaMA)
GROUPS = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_bias": ("gate_proj", "up_proj", "down_proj")}
PROJECTIONS = GROUPS["attention_bias"] + GROUPS["mlp_bias"]


@dataclass(frozen=True)
class BeftConfig(PeftConfig):
    peft_type: ClassVar[str] = "BEFT"
    NOT_PEFT: ClassVar[tuple] = ("exclude_modules", "layers_to_transform", "layers_pattern")

    init_weights: bool = True
    bias: str = "beft_only"

    def __post_init__(self):
        super().__post_init__()
        self._require("init_weights", isinstance(self.init_weights, bool), "must be true or false")
        self._require("bias", self.bias in BIAS, f"must be one of {BIAS}")
        for name in self.NOT_PEFT:
            self._require(name, getattr(self, name) is None, "is not a field of PEFT's BeftConfig; must be None")

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in self.NOT_PEFT + (("bias",) if self.bias == "none" else ()):
            del out[key]  # PEFT's keys only, unless existing biases train (PEFT loads them, ignoring the key)
        return out

    @classmethod
    def from_dict(cls, raw: dict, source: str = "adapter config") -> "BeftConfig":
        return super().from_dict({"bias": "none", **raw}, source)  # PEFT's file: its BEFT trains no b₀

    def for_model(self, model) -> "BeftConfig":
        """``bias`` is "none" where the model has no bias it would train (a LLaMA): PEFT's file."""
        if self.bias == "all":
            has = any(n.endswith(".bias") for n, _ in model.named_parameters())
        else:
            has = any(getattr(model.get_submodule(n), "base_layer", model.get_submodule(n)).bias is not None
                      for n in targeting.find_targets(model, self, (Linear, BeftLinear), "BEFT"))
        return self if has or self.bias == "none" else self.replace(bias="none")


class BeftLinear(AdapterLayer):
    """A Linear plus each active adapter's bias b: y = base(x) + b."""

    def __init__(self, base_layer: Linear):
        super().__init__(base_layer)
        self.beft_bias = ParameterDict()  # b: (1, out), as PEFT stores it
        self.saved_bias = {}  # adapter name -> (b₀ before its merge or None, b₀ + b as merged)

    def update_layer(self, name: str, config: BeftConfig, rng) -> None:
        weight, out = self.base_layer.weight, self.base_layer.out_features
        b = np.zeros((1, out)) if config.init_weights else rng.standard_normal((1, out))
        self.beft_bias[name] = Parameter(to_device(b.astype(weight.dtype), weight.device))

    def adapter_names(self) -> list[str]:
        return self.beft_bias.keys()

    def adapter_state(self, name: str) -> dict:
        return {"beft_bias": self.beft_bias[name]}  # file key ...v_proj.beft_bias (adapter name removed)

    def delete_adapter(self, name: str) -> None:
        del self.beft_bias[name]

    def adapter_forward(self, name, x, result):
        return result + self.beft_bias[name]  # (…, out) + (1, out)

    # ----- merge: b₀ ← b₀ + b, b₀ = 0 created where the Linear has none ----------------------
    def merge(self, names: list[str], safe: bool = False) -> None:
        base = self.base_layer
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names():
                continue  # merging twice is a no-op
            b = self.beft_bias[name].data.reshape(-1)
            before = None if base.bias is None else base.bias.data
            merged = (get_array_module(b).zeros_like(b) if before is None else before) + b
            if safe and not bool(get_array_module(merged).isfinite(merged).all()):
                raise ValueError(f"merging adapter {name!r} gives non-finite biases; it was not merged")
            if base.bias is None:
                base.bias = Tensor(merged)  # not a Parameter until merge_and_unload: see the docstring
            else:
                base.bias.data = merged
            self.saved_bias[name] = (before, merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.base_layer
        while self.merged_adapters:  # last merged first
            name = self.merged_adapters.pop()
            before, merged = self.saved_bias.pop(name)
            if before is None:
                base.bias = None
            elif get_array_module(merged).array_equal(base.bias.data, merged):
                base.bias.data = before  # exact: b₀ as it was
            else:  # b₀ trained while merged: keep that training
                base.bias.data = base.bias.data - self.beft_bias[name].data.reshape(-1)


def apply(model, config: BeftConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """Wrap every Linear ``config`` targets in a BEFT layer (or add an adapter to one already
    wrapped) and return the new biases b as the group ``bitfit:<adapter_name>``."""
    names = targeting.find_targets(model, config, (Linear, BeftLinear), "BEFT")
    for name in names:  # checked before anything changes
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            raise ConfigError(
                f"target_modules: BEFT adapts attention / MLP projections {list(PROJECTIONS)}, not {name!r} "
                "(a merged bias there could not be declared in the model's config)")
    params = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, BeftLinear):
            layer = BeftLinear(layer)
            layer.active_adapters = [adapter_name]  # a new layer runs its first adapter (PeftModel may change it)
            model.set_submodule(name, layer)
        layer.update_layer(adapter_name, config, rng)
        params.append(layer.beft_bias[adapter_name])
    return ParameterGroup(f"bitfit:{adapter_name}", params)


def declare_merged_biases(model) -> None:
    """After merge_and_unload: the biases merging created become parameters, and the config
    declares them (zero biases for the rest of their group; a qwen2 / mistral config becomes
    llama, the only family whose config can say so), so the folder transformers loads holds them."""
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, Linear)]
    created = [m for _, m in linears if m.bias is not None and not isinstance(m.bias, Parameter)]
    if not created:
        return
    for m in created:
        m.bias = Parameter(m.bias.data)
    config = model.config

    def declared(cfg, path):
        last = path.rsplit(".", 1)[-1]
        return (cfg.qkv_bias if last in ("q_proj", "k_proj", "v_proj") else cfg.o_bias if last == "o_proj"
                else cfg.mlp_bias if last in GROUPS["mlp_bias"] else False)

    undeclared = {flag for path, m in linears if m.bias is not None and not declared(config, path)
                  for flag, group in GROUPS.items() if path.rsplit(".", 1)[-1] in group}
    if not undeclared:
        return
    changes = {flag: getattr(config, flag) or flag in undeclared for flag in GROUPS}
    if config.model_type != "llama":  # qwen2 = llama with q/k/v biases; mistral without sliding window = llama
        changes.update(model_type="llama", attention_bias=config.qkv_bias or changes["attention_bias"],
                       extra={k: v for k, v in config.extra.items() if k != "architectures"})
    model.config = dataclasses.replace(config, **changes)
    for path, m in linears:
        if m.bias is None and declared(model.config, path):
            xp = get_array_module(m.weight.data)
            m.bias = Parameter(xp.zeros(m.out_features, dtype=m.weight.data.dtype))


# ----- the method's row in the table, and its command line ---------------------------------
def cli_config(args) -> BeftConfig:
    return BeftConfig(target_modules=targeting.parse_targets(args.target))


METHOD = PeftMethod(
    "BEFT", BeftConfig, apply, BeftLinear, "bitfit", default_target_modules=DEFAULT_TARGETS,
    after_unload=declare_merged_biases,
    cli=CliSpec({"bitfit": cli_config}, (TARGET,), "BitFit (BEFT; uses --target)"))
