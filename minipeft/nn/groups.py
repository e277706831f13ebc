"""`ParameterGroup`: a named set of trainable parameters with optional settings.

PEFT methods return their parameters as explicit groups (nothing selects
parameters by substrings of their names), and optimizers take groups, each
with its own learning rate and weight decay (``None`` = the optimizer's default).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .module import Parameter


@dataclass
class ParameterGroup:
    name: str  # who owns it, e.g. "lora:default" or "modules_to_save:default"
    params: list[Parameter] = field(default_factory=list)
    lr: float | None = None
    weight_decay: float | None = None

    def num_parameters(self) -> int:
        return sum(int(p.size) for p in self.params)
