"""The table of PEFT methods: ``peft_type`` -> :class:`PeftMethod`.

A method is its config class, its ``apply(model, config, rng, adapter_name)``
(which adapts the model in place and returns the new parameters as a
:class:`~minipeft.nn.ParameterGroup`), the adapter-layer class it creates, and
the optional hooks the training loop reaches through ``PeftModel``
(``regularizer``, ``mask_gradients``, ``on_step_end``, ``edit_optimizer_state``;
each takes the PeftModel and the adapter name first), and optional files an adapter
keeps beside PEFT's two (``save_extra`` / ``load_extra``: ReLoRA's merged updates).
The table is fixed when this module is imported: a new method adds its entry to
``METHODS`` below and its rows to the shared contract test,
tests/peft/test_contract.py, which iterates this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from ..errors import ConfigError
from . import adalora, dylora, lora, relora
from .config import PeftConfig


@dataclass(frozen=True)
class PeftMethod:
    peft_type: str  # PEFT's name, written as "peft_type" in adapter_config.json
    config_cls: type[PeftConfig]
    apply: Callable  # (model, config, rng, adapter_name) -> ParameterGroup
    layer_cls: type  # the AdapterLayer subclass apply() creates
    group_prefix: str  # parameter groups are named "<group_prefix>:<adapter name>"
    default_target_modules: tuple[str, ...] = ()  # PEFT's default for LLaMA when target_modules is None
    regularizer: Callable | None = None  # (peft_model, adapter_name) -> Tensor | None, added to the loss
    mask_gradients: Callable | None = None  # (peft_model, adapter_name, step), after backward
    on_step_end: Callable | None = None  # (peft_model, adapter_name, step), after the optimizer step
    saved_tensors: Callable | None = None  # (peft_model, adapter_name, {file key: array}) -> what to write
    edit_optimizer_state: Callable | None = None  # (peft_model, adapter_name, step, optimizer), after on_step_end
    save_extra: Callable | None = None  # (peft_model, adapter_name, folder): files beyond the adapter's tensors
    load_extra: Callable | None = None  # (peft_model, adapter_name, folder): reads them back (load, resume)


def get_method(peft_type: str) -> PeftMethod:
    try:
        return REGISTRY[peft_type]
    except KeyError:
        raise ConfigError(f"unknown peft_type {peft_type!r}; minipeft implements {sorted(REGISTRY)}") from None


def method_for(config: PeftConfig) -> PeftMethod:
    method = get_method(config.peft_type)
    if not isinstance(config, method.config_cls):
        raise ConfigError(f"a {type(config).__name__} cannot configure {method.peft_type}")
    return method


def config_from_dict(raw: dict, source: str = "adapter config") -> PeftConfig:
    """The config class named by ``raw["peft_type"]``, built from ``raw``."""
    if "peft_type" not in raw:
        raise ConfigError(f"{source}: no 'peft_type' key")
    return get_method(raw["peft_type"]).config_cls.from_dict(raw, source=source)


METHODS = (
    PeftMethod("LORA", lora.LoraConfig, lora.apply, lora.LoraLayer, "lora", default_target_modules=("q_proj", "v_proj")),
    PeftMethod("ADALORA", adalora.AdaLoraConfig, adalora.apply, adalora.AdaLoraLayer, "adalora",
               default_target_modules=("q_proj", "v_proj"), regularizer=adalora.regularizer,
               on_step_end=adalora.on_step_end, saved_tensors=adalora.saved_tensors,
               save_extra=adalora.save_extra, load_extra=adalora.load_extra),
    PeftMethod("DYLORA", dylora.DyLoraConfig, dylora.apply, dylora.DyLoraLayer, "dylora",
               default_target_modules=("q_proj", "v_proj"), mask_gradients=dylora.mask_gradients,
               on_step_end=dylora.on_step_end, save_extra=dylora.save_extra, load_extra=dylora.load_extra),
    PeftMethod("RELORA", relora.ReLoraConfig, relora.apply, relora.ReLoraLayer, "relora",
               default_target_modules=("q_proj", "v_proj"), on_step_end=relora.on_step_end,
               edit_optimizer_state=relora.edit_optimizer_state, save_extra=relora.save_extra,
               load_extra=relora.load_extra),
)
REGISTRY: Mapping[str, PeftMethod] = MappingProxyType({m.peft_type: m for m in METHODS})
