"""Neural-network building blocks: Module, Parameter and the LLaMA layers."""
from . import init
from .groups import ParameterGroup
from .layers import Embedding, Linear, RMSNorm
from .module import Module, ModuleList, Parameter

__all__ = ["Embedding", "Linear", "Module", "ModuleList", "Parameter", "ParameterGroup", "RMSNorm", "init"]
