"""Bottleneck adapters: Houlsby (Houlsby et al., 2019, arXiv:1902.00751) and Pfeiffer (Pfeiffer et al.,
2021, arXiv:2005.00247), as the ``adapters`` library 1.3.0 (adapter-hub/adapters) runs them on LLaMA:
``DoubleSeqBnConfig`` ("double_seq_bn", Houlsby) and ``SeqBnConfig`` ("seq_bn", Pfeiffer).

One adapter, at a residual join of a decoder layer (sublayer output f, o_proj / down_proj included,
residual stream h, both (B, T, d)), with W_down (m, d), b_down (m,), W_up (d, m), b_up (d,):

    B(z) = s · (act(z W_downᵀ + b_down) W_upᵀ + b_up)          m = max(1, d // reduction_factor)
    z = f + h   if original_ln_before   else   f               (the adapter's input)
    r = f       if residual_before_ln   else   z               (what its output is added to)
    out = dropout(B(z)) + r,    then   out + h   if original_ln_after   else   out

Pfeiffer (seq_bn: after the MLP only, original_ln_before):  h ← h + f + B(h + f), act ReLU.
Houlsby (double_seq_bn: after attention AND after the MLP):  h ← h + f + B(f), act swish (x·σ(x)).
LLaMA has no LayerNorm at the joins (the library passes layer_norm=None), so the "ln" flags only
choose where h is added. act: relu, swish / silu, gelu (erf), gelu_new / gelu_pytorch_tanh (tanh
approximation), tanh, sigmoid.

Parameters: 2·m·d + m + d per adapter site; seq_bn has one site per layer, double_seq_bn two
(minus the ``leave_out`` layers). reduction_factor may be a dict {"<layer>": rf, "default": rf}.

Identity: init_weights="mam_adapter" (W_down kaiming-uniform, W_up = b_up = 0) makes B = 0, so the
model starts as the base model exactly. The default "bert" (both weights ~ N(0, 0.02²), biases 0)
and "houlsby" (weights ~ N(0, 0.01²) truncated at ±0.02) are NOT the identity: B(z) is small but
non-zero, as in the library.

Merge: none (B is non-linear in its input); merging is refused.

Files: the ``adapters`` library's (additive/adapters_files.py): ``adapter_config.json`` with every
BnConfig field and ``adapter.safetensors`` keyed ``model.layers.L.output_adapters.adapters.<name>.
adapter_down.0.weight`` ..., the same names as in memory here.

Departures from the library: one active bottleneck adapter per join (no Stack / Parallel / Split
composition); LayerNorm inside the adapter (ln_before / ln_after), gating, PHM, parallel adapters,
stochastic depth, learned scaling, invertible and cross adapters and init_weights_seed are refused,
naming the field; "gelu" uses an erf approximation (|error| < 1.5e-7, Abramowitz & Stegun 7.1.26);
random inits draw from NumPy's generator (same distributions, different numbers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...autograd import ops
from ...autograd.fused import linear
from ...backend import to_device
from ...nn import Linear, Module, Parameter, ParameterGroup
from ..core.config import BaseConfig, _is_int, _is_number
from ..core.method import CliOption, CliSpec, PeftMethod
from .bottleneck_parts import ACTIVATIONS, INITS, BottleneckLayer, activation, holder_at, initial_weights

LOCATIONS = {"attention": "mh_adapter", "output": "output_adapter"}  # holder place -> config flag
# Library features minipeft does not implement: the only value accepted for each.
REFUSED = {"ln_before": False, "ln_after": False, "use_gating": False, "is_parallel": False,
           "stochastic_depth": 0.0, "phm_layer": False, "cross_adapter": False, "inv_adapter": None,
           "init_weights_seed": None}


@dataclass(frozen=True)
class BnConfig(BaseConfig):
    """The library's BnConfig fields and defaults; use SeqBnConfig / DoubleSeqBnConfig."""

    peft_type: ClassVar[str] = "BOTTLENECK"

    mh_adapter: bool = False  # an adapter after attention (attention_adapters)
    output_adapter: bool = True  # an adapter after the MLP (output_adapters)
    reduction_factor: float | dict = 16
    non_linearity: str = "relu"
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True
    adapter_residual_before_ln: bool = False  # equal either way without ln_after
    init_weights: str = "bert"
    scaling: float = 1.0
    dropout: float = 0.0
    leave_out: tuple[int, ...] = ()
    ln_before: bool = False
    ln_after: bool = False
    use_gating: bool = False
    is_parallel: bool = False
    stochastic_depth: float = 0.0
    phm_layer: bool = False
    cross_adapter: bool = False
    inv_adapter: str | None = None
    init_weights_seed: int | None = None

    def __post_init__(self):
        super().__post_init__()
        bools = ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "residual_before_ln",
                 "adapter_residual_before_ln")
        for name in bools:
            self._require(name, isinstance(getattr(self, name), bool), "must be true or false (post_add and "
                          "other strings are not implemented)" if name == "residual_before_ln" else "must be true or false")
        self._require("output_adapter", self.mh_adapter or self.output_adapter,
                      "and mh_adapter are both false: the adapter would be nowhere")
        rf = self.reduction_factor
        self._require("reduction_factor", _is_number(rf) and rf > 0 or isinstance(rf, dict) and "default" in rf and
                      all(_is_number(v) and v > 0 for v in rf.values()),
                      "must be a positive number or a dict {'<layer>': rf, 'default': rf}")
        self._require("non_linearity", isinstance(self.non_linearity, str) and self.non_linearity.lower() in
                      ACTIVATIONS, f"must be one of {ACTIVATIONS}")
        self._require("init_weights", self.init_weights in INITS, f"must be one of {INITS}")
        self._require("scaling", _is_number(self.scaling), "must be a number ('learned' / 'channel' are not "
                      "implemented)")
        self._require("dropout", _is_number(self.dropout) and 0 <= self.dropout < 1, "must lie in [0, 1)")
        leave_out = tuple(self.leave_out or ())
        self._require("leave_out", all(_is_int(i) and i >= 0 for i in leave_out), "must list layer indices")
        self._set("leave_out", leave_out)
        for name, only in REFUSED.items():
            self._require(name, getattr(self, name) == only, f"is a feature minipeft does not implement "
                          f"(only {only!r} is supported)")

    def locations(self) -> list[str]:
        return [loc for loc, flag in LOCATIONS.items() if getattr(self, flag)]

    def bottleneck_size(self, hidden: int, layer: int) -> int:
        """m = hidden // reduction_factor (the layer's own rf if the dict has one), at least 1."""
        rf = self.reduction_factor
        rf = rf.get(str(layer), rf["default"]) if isinstance(rf, dict) else rf
        return max(1, int(hidden // rf))


@dataclass(frozen=True)
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2021): one adapter after the MLP, input h + f, ReLU."""

    original_ln_before: bool = True


@dataclass(frozen=True)
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after attention and after the MLP, input f, swish."""

    mh_adapter: bool = True
    non_linearity: str = "swish"


class Bottleneck(Module):
    """One adapter at one join: ``adapter_down.0`` (the library's Sequential(Linear, act)) and ``adapter_up``."""

    def __init__(self, config: BnConfig, hidden: int, m: int, rng, dtype, device):
        self.config, self.rng = config, rng
        down, up = initial_weights(config.init_weights, hidden, m, rng)
        self.adapter_down = [Linear(hidden, m, bias=True)]
        self.adapter_up = Linear(m, hidden, bias=True)
        for layer, weight in ((self.adapter_down[0], down), (self.adapter_up, up)):
            layer.weight = Parameter(to_device(weight.astype(dtype), device))
            layer.bias = Parameter(to_device(np.zeros(layer.out_features, dtype), device))

    def state(self) -> dict[str, Parameter]:
        """File keys (after ``...adapters.<name>.``) -> parameters."""
        down, up = self.adapter_down[0], self.adapter_up
        return {"adapter_down.0.weight": down.weight, "adapter_down.0.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def up(self, z):
        """B(z) = s · (act(z W_downᵀ + b_down) W_upᵀ + b_up), (B, T, d); no dropout (AdapterFusion reads it)."""
        down = self.adapter_down[0]
        hidden = activation(self.config.non_linearity, linear(z, down.weight, down.bias))  # (B, T, m)
        return linear(hidden, self.adapter_up.weight, self.adapter_up.bias) * self.config.scaling

    def pre(self, f, h):
        """(z, r): the adapter's input and the residual its output joins (the library's pre_forward)."""
        z = f + h if self.config.original_ln_before else f
        return z, (f if self.config.residual_before_ln else z)

    def post(self, out, h):
        return out + h if self.config.original_ln_after else out  # the library's post_forward

    def join(self, f, h):
        z, r = self.pre(f, h)
        b = ops.dropout(self.up(z), self.config.dropout, self.rng, training=self.training)
        return self.post(b + r, h)


def apply(model, config: BnConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """Add adapter ``adapter_name`` at every join ``config`` asks for; return its parameters."""
    hidden, params = model.config.hidden_size, []
    for i, layer in enumerate(model.model.layers):
        if i in config.leave_out:
            continue
        weight = layer.mlp.down_proj.weight
        for location in config.locations():
            holder = holder_at(layer, location)
            holder.adapters[adapter_name] = Bottleneck(config, hidden, config.bottleneck_size(hidden, i), rng,
                                                       weight.dtype, weight.device)
            holder.active_adapters = holder.active_adapters or [adapter_name]
            params.extend(holder.adapter_state(adapter_name).values())
    if not params:
        raise ValueError(f"leave_out {list(config.leave_out)} leaves no layer for adapter {adapter_name!r}")
    return ParameterGroup(f"bottleneck:{adapter_name}", params)


# ----- the method's row in the table, and its command line ---------------------------------
REDUCTION = CliOption(("--reduction-factor",), dict(type=float, default=16,
                                                    help="bottleneck m = hidden // reduction factor (default 16)"))
NON_LINEARITY = CliOption(("--non-linearity",), dict(default=None, choices=ACTIVATIONS,
                                                     help="adapter activation (default: relu for pfeiffer, "
                                                          "swish for houlsby)"))
ADAPTER_INIT = CliOption(("--adapter-init",), dict(default="bert", choices=INITS,
                                                   help="bert (default), mam_adapter (starts as the identity), houlsby"))


def cli_config(args, cls) -> BnConfig:
    rf = int(args.reduction_factor) if float(args.reduction_factor).is_integer() else args.reduction_factor
    extra = {"non_linearity": args.non_linearity} if args.non_linearity else {}
    return cls(reduction_factor=rf, init_weights=args.adapter_init, **extra)


def _files():  # adapters_files imports this module: bind late
    from . import adapters_files  # noqa: PLC0415

    return adapters_files


METHOD = PeftMethod(
    "BOTTLENECK", BnConfig, apply, BottleneckLayer, "bottleneck", mergeable=False,
    write_folder=lambda *a: _files().write_bottleneck(*a),
    read_folder_config=lambda folder: _files().read_bottleneck_config(folder),
    read_folder_weights=lambda *a: _files().read_bottleneck_weights(*a),
    cli=CliSpec({"houlsby": lambda args: cli_config(args, DoubleSeqBnConfig),
                 "pfeiffer": lambda args: cli_config(args, SeqBnConfig)},
                (REDUCTION, NON_LINEARITY, ADAPTER_INIT), "bottleneck adapters (Houlsby / Pfeiffer)"))
