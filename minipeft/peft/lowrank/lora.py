"""LoRA: low-rank adaptation (Hu et al., 2021, arXiv:2106.09685), with the rank-stabilised
scaling of rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732). DoRA is in dora.py.

A targeted Linear, W of shape (out, in), frozen, becomes (eq. 3, scaled by α/r as in §4.1)

    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ          A: (r, in),  B: (out, r)
    s = lora_alpha / r         (LoRA)          s = lora_alpha / √r     (use_rslora)

i.e. W + ΔW with ΔW = s · B A of rank ≤ r; the forward never forms ΔW (two thin
matmuls). A targeted Embedding E (num, dim) reads columns of A_emb (r, num):
y = E[ids] + s · A_embᵀ[ids] B_embᵀ, B_emb (dim, r), so ΔE = s · (B_emb A_emb)ᵀ; no dropout.
r and lora_alpha per layer come from rank_pattern / alpha_pattern (targeting.pattern_value).

Trainable parameters: r·(in + out) per Linear, r·(num + dim) per Embedding (+ out,
or dim, with DoRA); plus every bias of the model (bias="all") or of the targeted
layers (bias="lora_only"), plus full copies of ``modules_to_save``.

Identity at init: init_lora_weights=True draws A ~ kaiming-uniform(a=√5) = U(±1/√in) and
B = 0, so ΔW = 0; "gaussian": A ~ N(0, 1/r²), B = 0; on embeddings A_emb = 0,
B_emb ~ N(0, 1). False: A and B random as nn.Linear's default (U(±1/√in), U(±1/√r);
N(0, 1) on embeddings) — not the identity, for tests. "pissa" (Meng et al., 2024,
arXiv:2404.02948): W = V S Uᵀ, A = diag(√(S_r/s)) U_rᵀ, B = V_r diag(√(S_r/s)), and
the base weight becomes W − s B A: the model is unchanged but W is not.

Merge: W ← W + s B A; unmerge: W ← W − s B A (exact up to one rounding each way).

Departures from PEFT: fan_in_fan_out, lora_bias and the data-driven inits (olora,
loftq, eva, corda, pissa_niter_K ...) are refused, naming the field; random inits
use NumPy's generator (same distributions as torch, different numbers); PiSSA's
SVD runs in float64; loading a saved adapter never reruns an init (the base of a
PiSSA adapter must be the residual model it was trained on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ...autograd import ops
from ...autograd.fused import embedding, linear, low_rank_linear
from ...backend import to_device, to_numpy
from ...nn import Embedding, Linear, Parameter, ParameterGroup, init
from ..core import targeting
from . import dora
from ..core.base import AdapterLayer, ParameterDict, refuse_tied
from ..core.config import PeftConfig, _is_int, _is_number
from ..core.method import CliOption, CliSpec, PeftMethod

INITS = (True, False, "gaussian", "pissa")


@dataclass(frozen=True)
class LoraConfig(PeftConfig):
    peft_type: ClassVar[str] = "LORA"
    PEFT_FIXED: ClassVar[dict] = {
        "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "fan_in_fan_out": False, "kasa_config": None,
        "layer_replication": None, "loftq_config": {}, "lora_bias": False, "lora_ga_config": None,
        "megatron_config": None, "megatron_core": "megatron.core", "monteclora_config": None,
        "qalora_group_size": 16, "target_parameters": None, "trainable_token_indices": None,
        "use_bdlora": None, "use_qalora": False, "velora_config": None}
    PEFT_INERT: ClassVar[frozenset] = frozenset({"megatron_core", "qalora_group_size"})

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        self._require("r", _is_int(self.r) and self.r > 0, "must be a positive integer")
        self._require("lora_alpha", _is_number(self.lora_alpha), "must be a number")
        self._require("lora_dropout", _is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
                      "must lie in [0, 1)")
        for name in ("use_rslora", "use_dora"):
            self._require(name, isinstance(getattr(self, name), bool), "must be true or false")
        self._require("init_lora_weights", any(self.init_lora_weights is v or isinstance(v, str) and
                                               self.init_lora_weights == v for v in INITS), f"must be one of {INITS}")
        self._require("bias", self.bias in ("none", "all", "lora_only"), "must be 'none', 'all' or 'lora_only'")
        for name, ok in (("rank_pattern", lambda v: _is_int(v) and v > 0), ("alpha_pattern", _is_number)):
            pattern = {} if getattr(self, name) is None else getattr(self, name)
            self._require(name, isinstance(pattern, dict) and all(isinstance(k, str) and ok(v)
                                                                  for k, v in pattern.items()),
                          "must map regex strings to " + ("positive ranks" if name[0] == "r" else "numbers"))
            self._set(name, dict(pattern))

    def for_loading(self) -> "LoraConfig":
        return self.replace(init_lora_weights=True) if self.init_lora_weights == "pissa" else self

    def scaling(self, r: int, alpha: float) -> float:
        """s = α / r, or α / √r with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


class LoraLayer(AdapterLayer):
    """What LoRA's Linear and Embedding share: ranks, scalings, ΔW, merge, DoRA hooks."""

    dora_axis: ClassVar[int]  # the axis of the stored weight DoRA's norm runs over

    def __init__(self, base_layer, rng):
        super().__init__(base_layer)
        self.r, self.lora_alpha, self.scaling, self.lora_dropout = {}, {}, {}, {}
        self.lora_magnitude_vector = {}  # adapter name -> dora.DoraMagnitude (use_dora only)
        self.dora_norms = {}  # adapter name -> DoRA's n while merged (for the exact unmerge)
        self.rng = rng  # numpy Generator for dropout masks, shared with the PeftModel

    def update_layer(self, name, r, alpha, config: LoraConfig, rng) -> None:
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = config.scaling(r, alpha)
        self.lora_dropout[name] = float(config.lora_dropout)
        A, B = self.initial_factors(name, config.init_lora_weights, rng)
        device, dtype = self.base_layer.weight.device, self.base_layer.weight.dtype
        self.set_factors(name, *(Parameter(to_device(np.asarray(t, dtype=dtype), device)) for t in (A, B)))
        if config.use_dora:
            dora.init_magnitude(self, name)

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def active_factors(self, name: str):
        """(A, B, s): the factors and scaling the forward and ΔW use (DyLoRA truncates them)."""
        A, B = self.factors(name)
        return A, B, self.scaling[name]

    def delta_ba(self, name: str):
        """ΔW = s · B A, shape (out, in) (for an embedding (dim, num)): the equation, once."""
        A, B, s = self.active_factors(name)
        return s * (B.data @ A.data)

    def delta_weight(self, name: str):
        """The update of the stored weight: ΔW for a Linear, ΔWᵀ for an Embedding (num, dim)."""
        delta = self.delta_ba(name)
        return delta if self.dora_axis == 1 else delta.T

    def merge_into(self, name, weight):
        if name in self.lora_magnitude_vector:
            return dora.merge_into(self, name, weight)
        return weight + self.delta_weight(name)

    def unmerge_from(self, name, weight, keep=False):
        if name in self.lora_magnitude_vector:
            return dora.unmerge_from(self, name, weight, keep)
        return weight - self.delta_weight(name)

    def adapter_state(self, name: str) -> dict:
        state = dict(zip(self.FILE_KEYS, self.factors(name)))  # PEFT's keys, adapter name removed
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return state

    def delete_adapter(self, name: str) -> None:
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.lora_magnitude_vector,
                      *(getattr(self, f) for f in self.FACTORS)):
            if name in table:
                del table[name]

    def dropout(self, name, x):
        return ops.dropout(x, self.lora_dropout[name], self.rng, training=self.training)

    def dropout_active(self, name) -> bool:
        return self.training and self.lora_dropout[name] > 0.0

    def adapter_forward(self, name, x, result):
        if name in self.lora_magnitude_vector:
            return dora.forward(self, name, x, result)
        return result + self.lora_branch(name, self.dropout(name, x))


class LoraLinear(LoraLayer):
    dora_axis = 1  # rows of W (out, in)
    FACTORS, FILE_KEYS = ("lora_A", "lora_B"), ("lora_A.weight", "lora_B.weight")

    def __init__(self, base_layer: Linear, rng):
        super().__init__(base_layer, rng)
        self.lora_A: dict[str, Linear] = {}  # A: (r, in) as lora_A[name].weight
        self.lora_B: dict[str, Linear] = {}  # B: (out, r)

    def initial_factors(self, name, how, rng):
        r, (out, inp) = self.r[name], self.base_layer.weight.shape
        if how == "pissa":
            return pissa_factors(self.base_layer, r, self.scaling[name])
        if how == "gaussian":
            return init.normal((r, inp), rng, std=1.0 / r, dtype=np.float64), np.zeros((out, r))
        A = init.kaiming_uniform((r, inp), rng, dtype=np.float64)
        B = init.kaiming_uniform((out, r), rng, dtype=np.float64) if how is False else np.zeros((out, r))
        return A, B

    def factors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def set_factors(self, name, A, B):
        self.lora_A[name], self.lora_B[name] = Linear(A.shape[1], A.shape[0]), Linear(B.shape[1], B.shape[0])
        self.lora_A[name].weight, self.lora_B[name].weight = A, B

    def lora_branch(self, name, x):
        """s · (x Aᵀ) Bᵀ: two thin matmuls, ΔW never formed; s scales the thin (…, r) middle."""
        A, B, s = self.active_factors(name)
        return linear(linear(x, A) * s, B)

    def _run(self, names, x):
        """One plain adapter (no dropout, no DoRA) on a Linear: base and branch as the one fused
        op :func:`~minipeft.autograd.fused.low_rank_linear` (same numbers as base(x) + lora_branch)."""
        if len(names) == 1 and self._fusable(names[0]):
            A, B, s = self.active_factors(names[0])
            return low_rank_linear(x, self.base_layer.weight, A, B, s, self.base_layer.bias)
        return super()._run(names, x)

    def _fusable(self, name) -> bool:
        cls = type(self)
        return (name not in self.lora_magnitude_vector and not self.dropout_active(name)
                and type(self.base_layer) is Linear and cls.lora_branch is LoraLinear.lora_branch
                and cls.adapter_forward is LoraLayer.adapter_forward and cls.adapter_input is AdapterLayer.adapter_input)


class LoraEmbedding(LoraLayer):
    dora_axis = 0  # columns of E (num, dim): PEFT's norm runs over the vocabulary
    FACTORS = FILE_KEYS = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: Embedding, rng):
        super().__init__(base_layer, rng)
        self.lora_embedding_A = ParameterDict()  # A_emb: (r, num)
        self.lora_embedding_B = ParameterDict()  # B_emb: (dim, r)

    def initial_factors(self, name, how, rng):
        r, (num, dim) = self.r[name], self.base_layer.weight.shape
        A = init.normal((r, num), rng, dtype=np.float64) if how is False else np.zeros((r, num))
        return A, init.normal((dim, r), rng, dtype=np.float64)

    def factors(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def set_factors(self, name, A, B):
        self.lora_embedding_A[name], self.lora_embedding_B[name] = A, B

    def dropout(self, name, ids):
        return ids  # PEFT applies no dropout to embedding adapters

    def dropout_active(self, name) -> bool:
        return False

    def lora_branch(self, name, ids):
        """s · A_embᵀ[ids] B_embᵀ: a lookup of r numbers per token, then one thin matmul."""
        A, B, s = self.active_factors(name)
        return linear(embedding(ops.transpose(A), ids), B) * s


def pissa_factors(base_layer, r: int, s: float):
    """PiSSA: A, B from the top-r singular triplets of W; W becomes the residual W − s B A."""
    weight = base_layer.weight
    W = to_numpy(weight.data).astype(np.float64)
    if r > min(W.shape):
        raise ValueError(f"init_lora_weights='pissa' needs r <= {min(W.shape)} for a weight of shape {W.shape}")
    V, S, Uh = np.linalg.svd(W, full_matrices=False)  # W = V diag(S) Uh
    root = np.sqrt(S[:r] / s)
    A, B = root[:, None] * Uh[:r], V[:, :r] * root[None, :]
    weight.data = to_device((W - s * (B @ A)).astype(weight.dtype), weight.device)
    return A, B


def apply(model, config: LoraConfig, rng, adapter_name: str = "default", *, classes=None,
          group_prefix: str = "lora") -> ParameterGroup:
    """Wrap every module ``config`` targets in a LoRA layer (or add an adapter to one already
    wrapped) and return the new parameters as the group ``<group_prefix>:<adapter_name>``.

    ``classes``: the (Linear, Embedding) layer classes to wrap with, for methods built on
    LoRA's layers (DyLoRA, ReLoRA); default (LoraLinear, LoraEmbedding)."""
    linear_cls, embedding_cls = classes or (LoraLinear, LoraEmbedding)
    names = targeting.find_targets(model, config, (Linear, Embedding, LoraLayer), "LoRA")
    if config.init_lora_weights == "pissa":  # PiSSA rewrites W: refuse a tied W before anything changes
        refuse_tied(model, names, "init_lora_weights='pissa' would rewrite")
    params = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraLayer):
            layer = (embedding_cls if isinstance(layer, Embedding) else linear_cls)(layer, rng)
            layer.active_adapters = [adapter_name]  # a new layer runs its first adapter (PeftModel may change it)
            model.set_submodule(name, layer)
        r = targeting.pattern_value(config.rank_pattern, name, config.r)
        alpha = targeting.pattern_value(config.alpha_pattern, name, config.lora_alpha)
        layer.update_layer(adapter_name, r, alpha, config, rng)
        params.extend(layer.adapter_state(adapter_name).values())
    return ParameterGroup(f"{group_prefix}:{adapter_name}", params)


# ----- the method's row in the table, and its command line ---------------------------------
# Shared by every LoRA-family method's ``minipeft train`` options (one object each, added once).
R = CliOption(("--r",), dict(type=int, default=8, help="rank r (DyLoRA: r_max) (default 8)"))
ALPHA = CliOption(("--alpha",), dict(type=float, default=16, help="lora_alpha (default 16; scale = alpha / r)"))
DROPOUT = CliOption(("--dropout",), dict(type=float, default=0.05,
                                         help="dropout on the adapter input (default 0.05)"))
TARGET = CliOption(("--target",), dict(default=None, help="comma-separated module names, or all-linear "
                                                          "(default: the method's PEFT default, q_proj,v_proj for LoRA)"))
RSLORA = CliOption(("--rslora",), dict(action="store_true", help="scale by alpha / sqrt(r) (rank-stabilised LoRA)"))


def cli_config(args, use_dora: bool = False) -> LoraConfig:
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=targeting.parse_targets(args.target), use_rslora=args.rslora,
                      use_dora=use_dora)


METHOD = PeftMethod(
    "LORA", LoraConfig, apply, LoraLayer, "lora", default_target_modules=("q_proj", "v_proj"),
    cli=CliSpec({"lora": cli_config, "dora": lambda args: cli_config(args, use_dora=True)},
                (R, ALPHA, DROPOUT, TARGET, RSLORA), "LoRA / DoRA"))
