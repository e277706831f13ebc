"""The table of PEFT methods: ``peft_type`` -> :class:`~minipeft.peft.core.method.PeftMethod`.

Each method file ends with its own ``METHOD`` row (the attachment points it uses, its
hooks, its files, its command-line options); ``METHODS`` below lists them, in the order
``minipeft train --method`` shows them. The table is fixed when this module is imported. A
new method adds its file, one line here, and its rows to the shared contract test,
tests/peft/test_contract.py, which iterates this table.

The method files import the core's low modules (config, base, targeting, names, method),
never this one, so there is no import cycle.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from ...errors import ConfigError
from ..additive import adapter_fusion, bottleneck
from ..additive import ia3
from ..additive import prefix_tuning
from ..additive import prompt_tuning
from ..lowrank import adalora, dylora, lokr, lora, relora
from ..selective import bitfit, child_tuning, fishmask, full
from .config import PeftConfig
from .method import CliOption, CliSpec, PeftMethod

METHODS: tuple[PeftMethod, ...] = (
    # low-rank
    lora.METHOD,
    adalora.METHOD,
    dylora.METHOD,
    relora.METHOD,
    lokr.METHOD,
    # additive
    prompt_tuning.METHOD,
    prefix_tuning.METHOD,
    ia3.METHOD,
    bottleneck.METHOD,
    adapter_fusion.METHOD,
    # selective (and the full fine-tuning baseline)
    bitfit.METHOD,
    child_tuning.METHOD,
    fishmask.METHOD,
    full.METHOD,
)
REGISTRY: Mapping[str, PeftMethod] = MappingProxyType({m.peft_type: m for m in METHODS})

__all__ = ["METHODS", "REGISTRY", "CliOption", "CliSpec", "PeftMethod", "config_from_dict", "get_method",
           "method_for"]


def get_method(peft_type: str) -> PeftMethod:
    try:
        return REGISTRY[peft_type]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown peft_type {peft_type!r}; minipeft implements {sorted(REGISTRY)}") from None


def method_for(config: PeftConfig) -> PeftMethod:
    method = get_method(config.peft_type)
    if not isinstance(config, method.config_cls):
        raise ConfigError(f"a {type(config).__name__} cannot configure {method.peft_type}")
    return method


def config_from_dict(raw: dict, source: str = "adapter config") -> PeftConfig:
    """The config class named by ``raw["peft_type"]``, built from ``raw``."""
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ConfigError(f"{source}: no 'peft_type' key")
    return get_method(raw["peft_type"]).config_cls.from_dict(raw, source=source)
