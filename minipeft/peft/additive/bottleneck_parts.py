"""What bottleneck.py and adapter_fusion.py share: the ``adapters`` library's activations and weight
inits for bottleneck adapters, and :class:`BottleneckLayer`, the adapter holder a decoder layer calls
at a residual join (``attention_adapters`` / ``output_adapters``, models/llama.py)."""
from __future__ import annotations

import math

import numpy as np

from ...autograd import ops
from ...autograd.function import Function
from ...backend import get_array_module
from ...nn import Module, Parameter, init
from ..core.base import AdapterHolder, mixed_rows

ACTIVATIONS = ("relu", "swish", "silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "tanh", "sigmoid")
INITS = ("bert", "mam_adapter", "houlsby")


class GeluErf(Function):
    # gelu(a) = a·Φ(a), Φ(a) = ½(1 + erf(a/√2));  d/da = Φ(a) + a·φ(a), φ(a) = e^(−a²/2)/√(2π)
    def forward(self, a):
        xp = get_array_module(a)
        x = a / math.sqrt(2.0)
        t = 1.0 / (1.0 + 0.3275911 * xp.abs(x))  # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        cdf = 0.5 * (1.0 + xp.sign(x) * (1.0 - poly * xp.exp(-x * x)))
        self.save(a, cdf)
        return a * cdf

    def backward(self, g):
        a, cdf = self.saved
        return g * (cdf + a * get_array_module(a).exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi))


def activation(name: str, x):
    """The library's ``non_linearity`` (transformers' activation of that lower-cased name)."""
    name = name.lower()
    if name == "relu":
        return ops.relu(x)
    if name in ("swish", "silu"):
        return ops.silu(x)
    if name == "gelu":
        return GeluErf.apply(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))
    return ops.tanh(x) if name == "tanh" else ops.sigmoid(x)


def initial_weights(how: str, hidden: int, m: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(W_down (m, d), W_up (d, m)) as the library's init_weights draws them (biases start at 0)."""
    if how == "mam_adapter":  # W_up = 0: the adapter starts as the identity
        return init.kaiming_uniform((m, hidden), rng, dtype=np.float64), np.zeros((hidden, m))
    if how == "houlsby":  # N(0, 0.01²) truncated at ±2σ (torch's trunc_normal_ redraws outside)
        def trunc(shape):
            out = rng.normal(0.0, 1e-2, shape)
            while (bad := np.abs(out) > 2e-2).any():
                out[bad] = rng.normal(0.0, 1e-2, int(bad.sum()))
            return out
        return trunc((m, hidden)), trunc((hidden, m))
    return rng.normal(0.0, 0.02, (m, hidden)), rng.normal(0.0, 0.02, (hidden, m))  # "bert"


class BottleneckLayer(AdapterHolder):
    """A decoder layer's ``attention_adapters`` or ``output_adapters``: named bottleneck adapters
    (``adapters``) and AdapterFusion layers (``adapter_fusion_layer``), each with a ``join(f, h)``."""

    def __init__(self, location: str):
        super().__init__()
        self.location = location  # "attention" | "output"
        self.adapters: dict[str, Module] = {}  # bottleneck.Bottleneck
        self.adapter_fusion_layer: dict[str, Module] = {}  # adapter_fusion.FusionLayer

    def adapter_names(self) -> list[str]:
        return [*self.adapters, *self.adapter_fusion_layer]

    def adapter_state(self, name: str) -> dict[str, Parameter]:
        if name in self.adapters:
            return self.adapters[name].state()
        return self.adapter_fusion_layer[name].trainable_state()  # the fused adapters stay frozen

    def delete_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.adapter_fusion_layer.pop(name, None)

    def forward(self, f, h):
        if self.disabled:
            return h + f
        if self.batch_adapters is not None:  # each row's adapter: split f and h by rows together
            d = f.shape[-1]
            return mixed_rows(self.batch_adapters, ops.concat([f, h], axis=-1),
                              lambda name, x: self._run([name] if name in self.adapter_names() else [],
                                                        x[..., :d], x[..., d:]))
        return self._run([n for n in self.active_adapters if n in self.adapter_names()], f, h)

    def _run(self, names: list[str], f, h):
        if not names:
            return h + f
        if len(names) > 1:
            raise ValueError(f"adapters {names} are all active at {self.location}_adapters: minipeft runs one "
                             "bottleneck adapter (or one AdapterFusion) at a time")
        module = self.adapters.get(names[0]) or self.adapter_fusion_layer[names[0]]
        return module.join(f, h)


def holder_at(layer, location: str) -> BottleneckLayer:
    """The layer's ``<location>_adapters`` holder, created (an instance attribute) when absent."""
    attr = f"{location}_adapters"
    if not isinstance(getattr(layer, attr, None), BottleneckLayer):
        setattr(layer, attr, BottleneckLayer(location))
    return getattr(layer, attr)
