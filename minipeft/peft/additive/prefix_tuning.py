"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv:2101.00190), as Hugging Face PEFT 0.21 runs it on LLaMA (tuners/prefix_tuning, peft_model.py).

Every attention layer l gets P trainable keys and values in front of the sequence's own (§4.1):

    K_l = [Pk_l ; x W_kᵀ],   V_l = [Pv_l ; x W_vᵀ]          Pk_l, Pv_l: (B, Hkv, P, Dh)

written into the KV cache before the sequence (PeftModel._forward_virtual), so every token reads
all P of them; the attention mask gets P leading ones and the real tokens sit at positions
P..P+T−1. The prefix is used as given: no RoPE, as PEFT injects it as past_key_values.
They come from one flat vector per virtual token, D = token_dim = Dh·Hkv, L = num_layers:

    prefix_projection=False:  T = E                                  E: (P, 2·L·D), N(0, 1)
    prefix_projection=True:   T = tanh(E W1ᵀ + b1) W2ᵀ + b2          E: (P, D), W1: (h, D), W2: (2·L·D, h)

(§4.3's reparametrisation, h = encoder_hidden_size; E ~ N(0, 1), W ~ U(±1/√in), b ~ U(±1/√in),
torch's nn.Embedding / nn.Linear defaults). T is viewed (P, 2L, Hkv, Dh), permuted to
(2L, Hkv, P, Dh) and split in pairs: rows 2l, 2l+1 are Pk_l, Pv_l (PEFT's get_prompt).

Parameters: P·2·L·D, or P·D + D·h + h + h·2·L·D + 2·L·D with the projection.
Not the identity at init: the base model's tokens attend to P extra keys (init_weights="zero",
zero keys and values, still takes softmax mass from the real tokens: it is no exact identity either).
Merge: none (the prefix is not a weight update); merging is refused.

Files (PEFT's): ``prompt_embeddings`` (P, 2·L·D), the final table T even with the projection,
whose MLP PEFT discards; a loaded adapter (inference) holds T itself.

Departures from PEFT: PEFT refuses ``is_trainable=True`` for every prompt-learning adapter; here
a table adapter loads trainable, and a projection adapter saved here keeps its MLP in
``prefix_projection.safetensors`` beside PEFT's two files, so it loads trainable too; without
that file (PEFT's own files) it is refused, as in PEFT. Sizes PEFT fills in from the model
(GQA: token_dim = Dh·Hkv, num_attention_heads = Hkv) must match the model if given (PEFT
overwrites them). Only num_transformer_submodules = 1 (decoder-only); task_type CAUSAL_LM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ...autograd import ops, no_grad
from ...backend import to_device, to_numpy
from ...errors import CheckpointError
from ...io import read_safetensors, write_safetensors
from ...nn import Embedding, Linear, Module, ParameterGroup, init
from ..core.base import AdapterHolder
from ..core.config import BaseConfig, _is_int
from ..core.method import CliOption, CliSpec, PeftMethod
from ..core.names import WEIGHTS_NAME

TABLE_KEY = "prompt_embeddings"  # PEFT's one key for prompt-learning adapters
PROJECTION_FILE = "prefix_projection.safetensors"  # the MLP of a projection adapter (minipeft only)


@dataclass(frozen=True)
class PrefixTuningConfig(BaseConfig):
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    PEFT_FIXED: ClassVar[dict] = {"modules_to_save": None}

    num_virtual_tokens: int | None = None  # P
    token_dim: int | None = None  # D = Dh·Hkv (None: from the model, as PEFT)
    num_transformer_submodules: int | None = None  # 1 for a decoder-only model
    num_attention_heads: int | None = None  # Hkv (None: from the model)
    num_layers: int | None = None  # L (None: from the model)
    init_weights: str | None = None  # None: random; "zero": zero table / zero last Linear
    encoder_hidden_size: int | None = None  # h (None: token_dim, as PEFT)
    prefix_projection: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._require("task_type", self.task_type == "CAUSAL_LM", "must be 'CAUSAL_LM' (prefix tuning runs in "
                      "a causal LM)")
        self._require("num_virtual_tokens", _is_int(self.num_virtual_tokens) and self.num_virtual_tokens > 0,
                      "must be a positive integer")
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            value = getattr(self, name)
            self._require(name, value is None or (_is_int(value) and value > 0), "must be a positive integer or null")
        self._require("num_transformer_submodules", self.num_transformer_submodules in (None, 1),
                      "must be 1 (a decoder-only model)")
        self._require("init_weights", self.init_weights in (None, "zero"), "must be null or 'zero'")
        self._require("prefix_projection", isinstance(self.prefix_projection, bool), "must be true or false")

    def for_model(self, model) -> "PrefixTuningConfig":
        """PEFT's _prepare_prompt_learning_config for LLaMA: L, D = Dh·Hkv, Hkv, h = D."""
        c = model.config
        sizes = {"num_layers": c.num_hidden_layers, "token_dim": c.head_dim * c.num_key_value_heads,
                 "num_attention_heads": c.num_key_value_heads, "num_transformer_submodules": 1}
        for name, value in sizes.items():
            self._require(name, getattr(self, name) in (None, value), f"must be {value} for this model "
                          "(the adapter was made for another model?)")
        hidden = self.encoder_hidden_size or sizes["token_dim"]
        return self.replace(**sizes, encoder_hidden_size=hidden)


class Tanh(Module):  # PEFT's transform is Sequential(Linear, Tanh, Linear): keys transform.0 / transform.2
    forward = staticmethod(ops.tanh)


class PrefixEncoder(AdapterHolder):
    """The prefix tables of every adapter, at ``model.prefix_encoder``: per adapter an Embedding
    (``embedding``) and, with the projection, ``transform`` = [Linear, Tanh, Linear] (PEFT's names)."""

    def __init__(self):
        super().__init__()
        self.prompt_encoder: dict[str, Module] = {}

    def add(self, name: str, config: PrefixTuningConfig, rng, dtype, device) -> None:
        P, D, h = config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size
        width, zero = config.num_layers * 2 * D, config.init_weights == "zero"
        entry = Module()
        if config.prefix_projection and not config.inference_mode:  # a loaded adapter holds T, as in PEFT
            entry.embedding = Embedding(P, D, rng=rng, dtype=dtype)
            entry.transform = [Linear(D, h, bias=True, rng=rng, dtype=dtype), Tanh(),
                               Linear(h, width, bias=True, rng=rng, dtype=dtype)]
            for layer in entry.transform[::2]:  # torch's bias default: U(±1/√in)
                bound = 1 / math.sqrt(layer.in_features)
                layer.bias.data = init.uniform((layer.out_features,), rng, -bound, bound, dtype=dtype)
            if zero:
                last = entry.transform[2]
                last.weight.data, last.bias.data = np.zeros_like(last.weight.data), np.zeros_like(last.bias.data)
        else:
            entry.embedding = Embedding(P, width, rng=None if zero else rng, dtype=dtype)
        self.prompt_encoder[name] = entry.to(device)

    def has_projection(self, name: str) -> bool:
        return hasattr(self.prompt_encoder[name], "transform")

    def table(self, name: str):
        """T (P, 2·L·D): the table, or the MLP of the virtual-token embeddings."""
        entry = self.prompt_encoder[name]
        if not self.has_projection(name):
            return entry.embedding.weight
        first, act, second = entry.transform
        return second(act(first(entry.embedding.weight)))

    def adapter_names(self) -> list[str]:
        return list(self.prompt_encoder)

    def adapter_state(self, name: str) -> dict:
        if not self.has_projection(name):
            return {TABLE_KEY: self.prompt_encoder[name].embedding.weight}
        return dict(self.prompt_encoder[name].named_parameters())

    def delete_adapter(self, name: str) -> None:
        self.prompt_encoder.pop(name, None)

    def file_key(self, path: str, key: str) -> str:
        return key  # prompt-learning keys carry no module path in PEFT's files


def encoder(peft_model) -> PrefixEncoder:
    return peft_model.base_model.model.prefix_encoder

def apply(model, config: PrefixTuningConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """Attach (or extend) ``model.prefix_encoder`` with adapter ``adapter_name``'s prefix."""
    config = config.for_model(model)
    if not isinstance(getattr(model, "prefix_encoder", None), PrefixEncoder):
        model.prefix_encoder = PrefixEncoder()
    weight = model.model.embed_tokens.weight
    model.prefix_encoder.add(adapter_name, config, rng, weight.dtype, weight.device)
    model.prefix_encoder.active_adapters = [adapter_name]
    return ParameterGroup(f"prefix:{adapter_name}", list(model.prefix_encoder.adapter_state(adapter_name).values()))


def prefix_key_values(peft_model, name: str, batch_size: int) -> list:
    """Per layer (Pk_l, Pv_l), each (B, Hkv, P, Dh): PEFT's view / permute / split of T."""
    config = peft_model.peft_config[name]
    P, L, H = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    flat = encoder(peft_model).table(name)  # (P, 2·L·D)
    kv = flat.reshape(P, 2 * L, H, config.token_dim // H).transpose(1, 2, 0, 3)  # (2L, Hkv, P, Dh)
    kv = ops.concat([kv.reshape(1, *kv.shape)] * batch_size, axis=0)  # (B, 2L, Hkv, P, Dh)
    return [(kv[:, 2 * layer], kv[:, 2 * layer + 1]) for layer in range(L)]


# ----- files: PEFT's table, plus the MLP of a projection adapter ----------------------------
def saved_tensors(peft_model, name: str, tensors: dict) -> dict:
    """PEFT writes the final table T only, also for a projection adapter."""
    with no_grad():
        return {TABLE_KEY: encoder(peft_model).table(name).data}


def save_extra(peft_model, name: str, folder: Path) -> None:
    if encoder(peft_model).has_projection(name):
        state = encoder(peft_model).adapter_state(name)
        write_safetensors(folder / PROJECTION_FILE, {k: p.data for k, p in state.items()}, metadata={"format": "pt"})


def read_folder_weights(peft_model, name: str, folder: Path) -> None:
    """Load ``prompt_embeddings`` (and, for a trainable projection adapter, its MLP), checked first."""
    holder, path = encoder(peft_model), folder / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"adapter file '{path}' does not exist")
    tensors = read_safetensors(path)
    config = peft_model.peft_config[name]
    shape = (config.num_virtual_tokens, 2 * config.num_layers * config.token_dim)
    if set(tensors) != {TABLE_KEY}:
        raise CheckpointError(f"adapter file '{path}' does not fit a prefix-tuning adapter: it holds keys "
                              f"{sorted(tensors)}, expected only {TABLE_KEY!r}")
    if tuple(tensors[TABLE_KEY].shape) != shape:
        raise CheckpointError(f"adapter file '{path}': tensor {TABLE_KEY!r} has shape {tuple(tensors[TABLE_KEY].shape)}"
                              f", the model expects {shape} (was the adapter saved for another base model?)")
    if holder.has_projection(name):
        tensors = _projection_tensors(holder, name, folder, tensors[TABLE_KEY])
    for key, p in holder.adapter_state(name).items():
        p.data = to_device(np.asarray(tensors[key], dtype=p.dtype), p.device)


def _projection_tensors(holder, name, folder, table) -> dict:
    path = folder / PROJECTION_FILE
    if not path.exists():
        raise CheckpointError(
            f"'{folder}' holds only the final prefix table of a prefix_projection adapter (PEFT saves no MLP), so "
            f"it cannot be trained further: PEFT refuses is_trainable for it too; load it with is_trainable=False")
    tensors, state = read_safetensors(path), holder.adapter_state(name)
    for key, p in state.items():
        if key not in tensors or tuple(tensors[key].shape) != tuple(p.shape):
            found = tuple(tensors[key].shape) if key in tensors else "nothing"
            raise CheckpointError(f"'{path}': {key!r} should be {tuple(p.shape)}, found {found}")
    saved = {key: p.data for key, p in state.items()}  # restored below: nothing changes until all checks pass
    for key, p in state.items():
        p.data = to_device(np.asarray(tensors[key], dtype=p.dtype), p.device)
    with no_grad():
        table_from_mlp = to_numpy(holder.table(name).data)
    for key, p in state.items():
        p.data = saved[key]
    if not np.allclose(table_from_mlp, table, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(table).max()))):
        raise CheckpointError(f"'{path}' does not produce the table in '{folder / WEIGHTS_NAME}': "
                              "the two files are from different adapters")
    return tensors


# ----- the method's row in the table, and its command line ---------------------------------
TOKENS = CliOption(("--prefix-tokens",), dict(type=int, default=20, help="virtual tokens P (default 20)"))
PROJECTION = CliOption(("--prefix-projection",), dict(action="store_true",
                                                       help="reparametrise the prefix by a 2-layer tanh MLP"))
HIDDEN = CliOption(("--prefix-hidden",), dict(type=int, default=None,
                                              help="MLP width (encoder_hidden_size; default token_dim)"))


def cli_config(args) -> PrefixTuningConfig:
    return PrefixTuningConfig(num_virtual_tokens=args.prefix_tokens, prefix_projection=args.prefix_projection,
                              encoder_hidden_size=args.prefix_hidden)


METHOD = PeftMethod(
    "PREFIX_TUNING", PrefixTuningConfig, apply, PrefixEncoder, "prefix", mergeable=False,
    prefix_key_values=prefix_key_values, saved_tensors=saved_tensors, save_extra=save_extra,
    read_folder_weights=read_folder_weights,
    cli=CliSpec({"prefix": cli_config}, (TOKENS, PROJECTION, HIDDEN), "prefix tuning"))
