"""AdapterFusion (Pfeiffer et al., 2021, arXiv:2005.00247), the ``adapters`` library 1.3.0's "dynamic"
preset: attention over the outputs of N frozen, trained bottleneck adapters (bottleneck.py).

At each join where all N adapters sit (sublayer output f, residual stream h, (B, T, d)), with the
last adapter's input z and residual r (bottleneck.py: z = h + f for seq_bn, f for double_seq_bn):

    U_n = B_n(z)                                   each adapter's scaled output, no dropout  (B, T, N, d)
    Q = z W_Qᵀ + b_Q,   K_n = U_n W_Kᵀ + b_K,   V_n = U_n W_Vᵀ        W_Q, W_K, W_V: (d, d)
    p = softmax_n(dropout(Q · K_n) / T)            no 1/√d (as the paper's eq. and the library)
    h ← Σ_n p_n V_n + r  (+ h when original_ln_after, as every preset has it)

W_V starts as the identity with 1e-6 off the diagonal (value_initialized); W_Q, W_K ~ N(0, 0.02²),
b_Q = b_K = 0. Only Q, K, V train: per fused join 2·(d² + d) + d² parameters (key / query / value
false drop theirs). Regulariser (paper §3.3, the trainer adds it to the loss):
R = 0.01 · Σ_joins ‖I − W_V‖²_F.

Identity: not the base model (the fused adapters act); over ONE adapter with W_V = I exactly it is
that adapter: p = 1, V U = U, so h ← h + f + B(z) bit for bit (a test checks it).

Merge: none (attention over non-linear adapters); refused.

The fused adapters are given as folders (ours or the library's: ``adapters=[dir_a, dir_b]``) or as
bottleneck configs (fresh adapters, e.g. for tests); apply() loads them, frozen, inside the fusion
layer (``adapter_fusion_layer.<name>.adapters.<member>``). Files (adapters_files.py): the library's
``adapter_fusion_config.json`` + ``model_adapter_fusion.safetensors`` (keys ``...adapter_fusion_layer.a,b.
query.weight``), and each fused adapter's folder beside them (``<folder>/<member>/``), where loading
looks for them (the library saves a fusion without its adapters: copy their folders in).

Departures from the library: temperature (T from 50 down by 0.05 per forward, floor 1) anneals
only in training mode, where the library also anneals on every eval / no_grad forward, so an eval
pass would change later outputs; ``regularization=False`` switches R off (the library ignores the
flag); residual_before and value_before_softmax=False are refused, naming the field. On LLaMA the
score dropout is 0 unless ``dropout_prob`` is set (LlamaConfig has no attention_probs_dropout_prob).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ...autograd import ops
from ...autograd.fused import linear, softmax
from ...backend import to_device
from ...errors import ConfigError
from ...nn import Linear, Module, Parameter, ParameterGroup
from ..core.config import BaseConfig, _is_number
from ..core.method import CliOption, CliSpec, PeftMethod
from .bottleneck import BnConfig, Bottleneck
from .bottleneck_parts import BottleneckLayer, holder_at

FLAGS = ("key", "query", "value", "value_initialized", "temperature", "regularization", "query_before_ln")


@dataclass(frozen=True)
class AdapterFusionConfig(BaseConfig):
    peft_type: ClassVar[str] = "ADAPTER_FUSION"

    adapters: tuple = ()  # the fused adapters: folders (str / Path) or BnConfigs (fresh adapters)
    adapter_names: tuple[str, ...] | None = None  # default: each folder's "name" (the folder names when those
    # clash, e.g. two minipeft runs saved as "default"); "adapter<i>" for configs
    key: bool = True
    query: bool = True
    value: bool = True
    value_initialized: bool = True
    temperature: bool = False
    regularization: bool = True
    query_before_ln: bool = False
    dropout_prob: float | None = None
    residual_before: bool = False
    value_before_softmax: bool = True

    def __post_init__(self):
        super().__post_init__()
        adapters = tuple(str(a) if isinstance(a, Path) else a for a in (self.adapters or ()))
        self._require("adapters", len(adapters) > 0 and all(isinstance(a, (str, BnConfig)) for a in adapters),
                      "must list at least one adapter folder (or bottleneck config)")
        self._set("adapters", adapters)
        if self.adapter_names is not None:
            names = tuple(self.adapter_names)
            self._require("adapter_names", len(names) == len(adapters) and len(set(names)) == len(names) and
                          all(isinstance(n, str) and n and not set(n) & set(".,") for n in names),
                          "must give one distinct name (without '.' or ',') per adapter")
            self._set("adapter_names", names)
        for name in FLAGS:
            self._require(name, isinstance(getattr(self, name), bool), "must be true or false")
        self._require("dropout_prob", self.dropout_prob is None or _is_number(self.dropout_prob) and
                      0 <= self.dropout_prob < 1, "must be null or lie in [0, 1)")
        self._require("residual_before", self.residual_before is False, "true is not implemented")
        self._require("value_before_softmax", self.value_before_softmax is True, "false is not implemented")


class FusionLayer(Module):
    """AdapterFusion at one join: the frozen fused adapters (``adapters``), ``query``, ``key``, ``value``."""

    def __init__(self, config: AdapterFusionConfig, members: dict, hidden: int, rng, dtype, device):
        self.config, self.rng = config, rng
        self.adapters: dict[str, Bottleneck] = members  # frozen: not in trainable_state
        self.T = 50.0 if config.temperature else 1.0
        self.reduction = self.T / 1000.0

        def dense(bias, identity=False):
            layer = Linear(hidden, hidden, bias=bias)
            w = rng.normal(0.0, 0.02, (hidden, hidden))
            if identity:  # the library's value init: 1 on the diagonal, 1e-6 elsewhere
                w = np.full((hidden, hidden), 1e-6)
                np.fill_diagonal(w, 1.0)
            layer.weight = Parameter(to_device(w.astype(dtype), device))
            if bias:
                layer.bias = Parameter(to_device(np.zeros(hidden, dtype), device))
            return layer

        self.query = dense(True) if config.query else None
        self.key = dense(True) if config.key else None
        self.value = dense(False, config.value_initialized) if config.value else None

    def trainable_state(self) -> dict[str, Parameter]:
        out = {}
        for part in ("query", "key", "value"):
            if (layer := getattr(self, part)) is not None:
                out[f"{part}.weight"] = layer.weight
                if layer.bias is not None:
                    out[f"{part}.bias"] = layer.bias
        return out

    def join(self, f, h):
        last = list(self.adapters.values())[-1]  # the library takes z, r and the ln flags from the last one
        z, r = last.pre(f, h)
        query = f if self.config.query_before_ln else z
        U = ops.concat([ops.reshape(m.up(z), (*z.shape[:-1], 1, z.shape[-1])) for m in self.adapters.values()],
                       axis=-2)  # (B, T, N, d)
        Q = query if self.query is None else linear(query, self.query.weight, self.query.bias)  # (B, T, d)
        K = U if self.key is None else linear(U, self.key.weight, self.key.bias)  # (B, T, N, d)
        V = U if self.value is None else linear(U, self.value.weight)  # (B, T, N, d)
        scores = ops.sum(ops.reshape(Q, (*Q.shape[:-1], 1, Q.shape[-1])) * K, axis=-1)  # (B, T, N)
        scores = ops.dropout(scores, self.config.dropout_prob or 0.0, self.rng, training=self.training)
        p = softmax(scores / self.T if self.T != 1.0 else scores, axis=-1)
        if self.training:
            self.T = max(self.T - self.reduction, 1.0)
        context = ops.sum(ops.reshape(p, (*p.shape, 1)) * V, axis=-2)  # (B, T, d)
        return last.post(context + r, h)


def member_specs(config: AdapterFusionConfig) -> list[tuple[str, BnConfig, dict | None]]:
    """(name, bottleneck config, tensors by layer-relative key or None for a fresh adapter) per member."""
    from .adapters_files import read_member  # noqa: PLC0415 - the file format builds on this module

    specs = []
    for i, spec in enumerate(config.adapters):
        name = config.adapter_names[i] if config.adapter_names else None
        specs.append((name or f"adapter{i}", spec, None) if isinstance(spec, BnConfig) else read_member(spec, name))
    names = [s[0] for s in specs]
    folders = [Path(a).name for a in config.adapters if not isinstance(a, BnConfig)]
    if not config.adapter_names and len(set(names)) < len(names) and len(folders) == len(set(folders)) == len(names):
        from .adapters_files import read_member  # noqa: PLC0415
        specs = [read_member(a, Path(a).name) for a in config.adapters]  # e.g. two runs saved as "default"
        names = folders
    if len(set(names)) != len(names) or any(set(n) & set(".,") for n in names):
        raise ConfigError(f"AdapterFusionConfig field 'adapter_names': the fused adapters are named {names}; "
                          "give distinct names without '.' or ','")
    return specs


def apply(model, config: AdapterFusionConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """Load the fused adapters (frozen) and add a fusion layer at every join they all share."""
    from .adapters_files import fill  # noqa: PLC0415

    specs, hidden, params = member_specs(config), model.config.hidden_size, []
    for i, layer in enumerate(model.model.layers):
        weight = layer.mlp.down_proj.weight
        for location in ("attention", "output"):
            here = [s for s in specs if location in s[1].locations() and i not in s[1].leave_out]
            if not here:
                continue
            if len(here) < len(specs):
                raise ConfigError(f"AdapterFusionConfig field 'adapters': {[s[0] for s in here]} sit at layer {i}'s "
                                  f"{location}_adapters but {[s[0] for s in specs if s not in here]} do not")
            members = {}
            for name, bn, tensors in specs:
                members[name] = Bottleneck(bn, hidden, bn.bottleneck_size(hidden, i), rng, weight.dtype, weight.device)
                if tensors is not None:
                    fill(members[name].state(), tensors, f"model.layers.{i}.{location}_adapters.adapters.{name}.")
                for p in members[name].state().values():
                    p.requires_grad = False
            fusion = FusionLayer(config, members, hidden, rng, weight.dtype, weight.device)
            holder = holder_at(layer, location)
            holder.adapter_fusion_layer[adapter_name] = fusion
            holder.active_adapters = holder.active_adapters or [adapter_name]
            params.extend(fusion.trainable_state().values())
    if not params:
        raise ConfigError("AdapterFusionConfig field 'adapters': the adapters share no join (or have no "
                          "trainable fusion part: key, query and value all false)")
    return ParameterGroup(f"adapter_fusion:{adapter_name}", params)


def regularizer(peft_model, name: str):
    """R = 0.01 · Σ_joins ‖I − W_V‖²_F (None without a value matrix or with regularization off)."""
    terms = []
    for _, holder in peft_model.adapter_layers(name, BottleneckLayer):
        fusion = holder.adapter_fusion_layer.get(name)
        if fusion is None or fusion.value is None or not fusion.config.regularization:
            continue
        W = fusion.value.weight
        diff = W - to_device(np.eye(W.shape[0], dtype=W.dtype), W.device)
        terms.append(ops.sum(diff * diff))
    return None if not terms else sum(terms[1:], terms[0]) * 0.01


# ----- the method's row in the table, and its command line ---------------------------------
FUSION_ADAPTERS = CliOption(("--fusion-adapters",), dict(nargs="+", default=None, metavar="DIR",
                                                         help="fusion: the trained bottleneck adapter folders to fuse"))


def cli_config(args) -> AdapterFusionConfig:
    if not args.fusion_adapters:
        raise ConfigError("--method fusion needs --fusion-adapters DIR [DIR ...] (trained bottleneck adapters)")
    return AdapterFusionConfig(adapters=tuple(args.fusion_adapters))


def _files():
    from . import adapters_files  # noqa: PLC0415

    return adapters_files


METHOD = PeftMethod(
    "ADAPTER_FUSION", AdapterFusionConfig, apply, BottleneckLayer, "adapter_fusion", mergeable=False,
    regularizer=regularizer,
    write_folder=lambda *a: _files().write_fusion(*a),
    read_folder_config=lambda folder: _files().read_fusion_config(folder),
    read_folder_weights=lambda *a: _files().read_fusion_weights(*a),
    cli=CliSpec({"fusion": cli_config}, (FUSION_ADAPTERS,), "AdapterFusion"))
