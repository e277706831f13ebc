"""Bottleneck adapters and AdapterFusion on disk in the ``adapters`` library 1.3.0's layout, both ways.

A bottleneck adapter folder (``model.save_adapter(dir, name, use_safetensors=True)``):

    adapter_config.json   {"config": {every BnConfig field}, "hidden_size", "model_class", "model_name",
                           "model_type", "name", "version"}   (json, indent 2, sorted keys)
    adapter.safetensors   model.layers.L.{attention,output}_adapters.adapters.<name>.adapter_down.0.weight (m, d)
                          ... adapter_down.0.bias (m,), adapter_up.weight (d, m), adapter_up.bias (d,)

An AdapterFusion folder (``model.save_adapter_fusion(dir, "a,b", use_safetensors=True)``), plus here
each fused adapter's folder ``<dir>/<member>/`` (the library saves those separately):

    adapter_fusion_config.json        {"adapter_names": [...], "config": {...}, ..., "name": "a,b"}
    model_adapter_fusion.safetensors  model.layers.L.output_adapters.adapter_fusion_layer.a,b.query.weight (d, d)
                                      ... query.bias, key.weight, key.bias, value.weight

The library also writes head_config.json / model_head.safetensors (the LM head's weight) for a
ForCausalLM; minipeft neither writes nor needs them (the library loads adapters without them).
Keys saved from a bare LlamaModel (``layers.L...``) are read as ``model.layers.L...``. Pickle files
(pytorch_adapter.bin, pytorch_model_adapter_fusion.bin) are refused, never unpickled.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import numpy as np

from ...backend import to_device, to_numpy
from ...errors import CheckpointError, ConfigError
from ...io import read_json, read_safetensors, write_json, write_safetensors
from .adapter_fusion import AdapterFusionConfig
from ..core.config import BaseConfig
from .bottleneck import BnConfig, DoubleSeqBnConfig, SeqBnConfig
from .bottleneck_parts import BottleneckLayer

VERSION = "adapters.1.3.0"
CONFIG, WEIGHTS = "adapter_config.json", "adapter.safetensors"
FUSION_CONFIG, FUSION_WEIGHTS = "adapter_fusion_config.json", "model_adapter_fusion.safetensors"
PICKLES = {WEIGHTS: "pytorch_adapter.bin", FUSION_WEIGHTS: "pytorch_model_adapter_fusion.bin"}
# BnConfig fields written with the library's defaults and ignored on reading (PHM is off: phm_layer is refused)
INERT = {"factorized_phm_W": True, "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform",
         "inv_adapter_reduction_factor": None, "learn_phm": True, "phm_bias": True, "phm_c_init": "normal",
         "phm_dim": 4, "phm_init_range": 0.0001, "phm_rank": 1, "shared_W_phm": False, "shared_phm_rule": True}
BN_FIELDS = [f for f in dataclasses.fields(BnConfig)  # BnConfig's own fields (the library's), not BaseConfig's
             if f.name not in {g.name for g in dataclasses.fields(BaseConfig)}]
FUSION_FIELDS = ("dropout_prob", "key", "query", "query_before_ln", "regularization", "residual_before",
                 "temperature", "value", "value_before_softmax", "value_initialized")


def header(peft_model, name: str, config) -> dict:
    model = peft_model.base_model.model
    return {"hidden_size": model.config.hidden_size, "model_class": "LlamaForCausalLM",
            "model_name": config.base_model_name_or_path or getattr(model, "name_or_path", None) or "",
            "model_type": "llama", "name": name, "version": VERSION}


def config_object(config: BnConfig) -> dict:
    """The library's full ``"config"`` object of a bottleneck adapter."""
    out = dict(INERT)
    for f in BN_FIELDS:
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def bn_config(raw: dict, source: str) -> BnConfig:
    """A bottleneck config from the library's ``"config"`` object; missing keys take BnConfig's defaults."""
    raw = dict(raw)
    if raw.pop("architecture", None) not in (None, "bottleneck"):
        raise ConfigError(f"{source}: architecture {raw.get('architecture')!r}: minipeft reads only bottleneck "
                          "adapters from the adapters library")
    names = {f.name for f in BN_FIELDS}
    unknown = sorted(k for k in raw if k not in names and k not in INERT)
    if unknown:
        warnings.warn(f"{source}: ignoring keys minipeft's BnConfig does not know: {unknown}", stacklevel=3)
    values = {f.name: raw.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in BN_FIELDS}
    try:
        return (DoubleSeqBnConfig if values["mh_adapter"] else SeqBnConfig)(**values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def read_tensors(path: Path) -> dict:
    if not path.exists():
        pickle = path.with_name(PICKLES[path.name])
        if pickle.exists():
            raise CheckpointError(f"'{pickle}' is a pickle file, which minipeft never loads (unpickling runs "
                                  "arbitrary code); re-save it with use_safetensors=True in the adapters library")
        raise CheckpointError(f"adapter file '{path}' does not exist")
    return {("model." + k if k.startswith("layers.") else k): v for k, v in read_safetensors(path).items()}


def copy_strict(expected: dict, tensors: dict, path: Path) -> None:
    """Copy ``tensors`` into the ``expected`` parameters (same keys), checking everything first."""
    for key, p in expected.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(p.shape):
            raise CheckpointError(f"adapter file '{path}' does not fit the model: tensor {key!r} has shape "
                                  f"{tuple(tensors[key].shape)}, the model expects {tuple(p.shape)}")
    missing, unexpected = [k for k in expected if k not in tensors], [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"adapter file '{path}' does not fit the model: missing keys {missing[:3]}, "
                              f"unexpected keys {unexpected[:3]}")
    for key, p in expected.items():
        p.data = to_device(np.asarray(tensors[key], dtype=p.dtype), p.device)


def bottleneck_state(peft_model, name: str, file_name: str, holders=None) -> dict:
    """File key -> Parameter of bottleneck adapter ``name`` (keyed under ``file_name``)."""
    out = {}
    for path, holder in holders or peft_model.adapter_layers(name, BottleneckLayer):
        if name in holder.adapters:
            out.update({f"{path}.adapters.{file_name}.{k}": p for k, p in holder.adapters[name].state().items()})
    return out


# ----- bottleneck adapters ----------------------------------------------------------------
def write_adapter(folder: Path, config: BnConfig, head: dict, params: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS, {k: to_numpy(p.data) for k, p in params.items()})
    write_json(folder / CONFIG, {"config": config_object(config), **head}, sort_keys=True, end="")


def write_bottleneck(peft_model, name: str, folder: Path) -> None:
    config = peft_model.peft_config[name]
    write_adapter(folder, config, header(peft_model, name, config), bottleneck_state(peft_model, name, name))


def read_bottleneck_config(folder) -> BnConfig | None:
    """The config of the library's adapter folder, None when ``folder`` is in another layout."""
    path = Path(folder) / CONFIG
    if not path.exists():
        return None
    raw = read_json(path, "adapter config", ConfigError)
    if "peft_type" in raw or not isinstance(raw.get("config"), dict):
        return None  # PEFT's layout
    return bn_config(raw["config"], str(path))


def read_bottleneck_weights(peft_model, name: str, folder: Path) -> None:
    file_name = read_json(folder / CONFIG, "adapter config", ConfigError).get("name") or name
    copy_strict(bottleneck_state(peft_model, name, file_name), read_tensors(folder / WEIGHTS), folder / WEIGHTS)


def read_member(path, name: str | None):
    """(name, config, tensors keyed under ``name``) of a fused adapter's folder (AdapterFusion's apply)."""
    folder = Path(path)
    config = read_bottleneck_config(folder) if folder.is_dir() else None
    if config is None:
        raise CheckpointError(f"'{folder}' is not a bottleneck adapter folder (no adapters-library {CONFIG})")
    file_name = read_json(folder / CONFIG, "adapter config", ConfigError).get("name") or folder.name
    name = name or file_name
    key = re.compile(rf"(model\.layers\.\d+\.(?:attention|output)_adapters\.adapters\.){re.escape(file_name)}"
                     r"\.((?:adapter_down\.0|adapter_up)\.(?:weight|bias))")
    tensors = {}
    for k, v in read_tensors(folder / WEIGHTS).items():
        if not (m := key.fullmatch(k)):
            raise CheckpointError(f"adapter file '{folder / WEIGHTS}' has unexpected key {k!r}")
        tensors[f"{m.group(1)}{name}.{m.group(2)}"] = v
    return name, config, tensors


def fill(state: dict, tensors: dict, prefix: str) -> None:
    """Copy the fused adapter's ``tensors`` (``prefix`` + key) into its module's ``state``."""
    copy_strict(state, {k: tensors[prefix + k] for k in state if prefix + k in tensors}, Path(prefix.rstrip(".")))


# ----- AdapterFusion ----------------------------------------------------------------------
def fusion_layers(peft_model, name: str) -> list:
    return [(path, holder.adapter_fusion_layer[name]) for path, holder in peft_model.adapter_layers(name, BottleneckLayer)
            if name in holder.adapter_fusion_layer]


def write_fusion(peft_model, name: str, folder: Path) -> None:
    config, layers = peft_model.peft_config[name], fusion_layers(peft_model, name)
    members = list(layers[0][1].adapters)
    fused = ",".join(members)
    for member in members:
        params = {f"{path}.adapters.{member}.{k}": p for path, layer in layers
                  for k, p in layer.adapters[member].state().items()}
        write_adapter(folder / member, layers[0][1].adapters[member].config, header(peft_model, member, config),
                      params)
    tensors = {f"{path}.adapter_fusion_layer.{fused}.{k}": to_numpy(p.data) for path, layer in layers
               for k, p in layer.trainable_state().items()}
    write_safetensors(folder / FUSION_WEIGHTS, tensors)
    body = {"adapter_names": members, "config": {k: getattr(config, k) for k in FUSION_FIELDS},
            **header(peft_model, fused, config)}
    write_json(folder / FUSION_CONFIG, body, sort_keys=True, end="")


def read_fusion_config(folder) -> AdapterFusionConfig | None:
    folder = Path(folder)
    path = folder / FUSION_CONFIG
    if not path.exists():
        return None
    raw = read_json(path, "adapter fusion config", ConfigError)
    names = raw.get("adapter_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: 'adapter_names' must list the fused adapters, got {names!r}")
    for n in names:
        if not (folder / n / CONFIG).exists():
            raise CheckpointError(f"{path}: the fused adapter {n!r} is not in '{folder / n}'; the adapters library "
                                  f"saves a fusion without its adapters: save each there (model.save_adapter("
                                  f"'{folder / n}', '{n}', use_safetensors=True))")
    fields = dict(raw.get("config") or {})
    unknown = sorted(k for k in fields if k not in FUSION_FIELDS)
    if unknown:
        warnings.warn(f"{path}: ignoring keys AdapterFusionConfig does not know: {unknown}", stacklevel=3)
    fields = {k: v for k, v in fields.items() if k in FUSION_FIELDS}
    try:
        return AdapterFusionConfig(adapters=tuple(str(folder / n) for n in names), adapter_names=tuple(names),
                                   **fields)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def read_fusion_weights(peft_model, name: str, folder: Path) -> None:
    raw = read_json(folder / FUSION_CONFIG, "adapter fusion config", ConfigError)
    fused = raw.get("name") or ",".join(raw["adapter_names"])
    expected = {f"{path}.adapter_fusion_layer.{fused}.{k}": p for path, layer in fusion_layers(peft_model, name)
                for k, p in layer.trainable_state().items()}
    copy_strict(expected, read_tensors(folder / FUSION_WEIGHTS), folder / FUSION_WEIGHTS)

