"""`LlamaConfig`: the architecture of a LLaMA-family model, read from ``config.json``.

A frozen dataclass validated when built: a bad value raises ``ConfigError``
naming the field. Both spellings transformers has used are read: ``rope_theta``
+ ``rope_scaling`` (transformers 4.x) and ``rope_parameters`` (5.x).

Supported families (``model_type``):
* ``llama``   — optional biases on q/k/v/o together (``attention_bias``), on the MLP (``mlp_bias``);
* ``qwen2``   — always biases on q/k/v, never on o_proj;
* ``mistral`` — a LLaMA without sliding-window attention (``sliding_window`` must be null).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import read_json

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# check_fits refuses a config needing more than 4 × the stored values + 1M parameters
_SLACK_FACTOR, _SLACK_VALUES = 4, 2 ** 20


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # other keys, kept for saving

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config field 'model_type' is {self.model_type!r}; minipeft supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act' is {self.hidden_act!r}; only 'silu' is supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple "
                f"of 'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for RoPE, got {self.head_dim}")
        # A string here used to fail as "'>' not supported", a NaN or a theta <= 0 as NaN logits.
        _positive_number("rms_norm_eps", self.rms_norm_eps)
        _positive_number("rope_theta", self.rope_theta)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):  # "false" would be true
                raise ConfigError(f"config field {name!r} must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        self._check_rope_angles()

    def _check_rope_angles(self) -> None:
        """A positive theta or factor can still give infinite frequencies in float32 (theta
        1e-40, factor 1e-45) and so NaN logits: compute them (Dh/2 numbers) and refuse that.
        A head_dim too large to compute them for is left to the size check against the file."""
        if self.head_dim > 2 ** 16:
            return
        from .rope import inverse_frequencies  # noqa: PLC0415 - rope builds on this module

        with np.errstate(all="ignore"):
            inv_freq = inverse_frequencies(self)
            angles = inv_freq * np.float32(self.max_position_embeddings)
        if not (np.isfinite(angles).all() and (inv_freq >= 0).all()):
            raise ConfigError(f"config fields 'rope_theta' ({self.rope_theta!r}) and 'rope_scaling' "
                              f"({self.rope_scaling!r}) give non-finite RoPE frequencies in float32")

    def _check_rope_scaling(self) -> None:
        if not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"config field 'rope_scaling' must be an object (or null), "
                              f"got {self.rope_scaling!r}")
        kind = self.rope_type
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"config field 'rope_scaling' has rope_type {kind!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if kind != "default" and "factor" not in self.rope_scaling:
            raise ConfigError(f"config field 'rope_scaling' of type {kind!r} needs a 'factor'")
        if kind == "default":
            return
        _positive_number("rope_scaling.factor", self.rope_scaling["factor"])
        if kind == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ConfigError(f"config field 'rope_scaling' of type 'llama3' needs {key!r}")
            low, high = self.rope_scaling["low_freq_factor"], self.rope_scaling["high_freq_factor"]
            _positive_number("rope_scaling.low_freq_factor", low)
            _positive_number("rope_scaling.high_freq_factor", high)
            if not high > low:  # the smooth band divides by high − low
                raise ConfigError(f"config field 'rope_scaling.high_freq_factor' ({high}) must be larger than "
                                  f"'low_freq_factor' ({low})")
            length = self.rope_scaling["original_max_position_embeddings"]
            if not _is_int(length) or length <= 0:
                raise ConfigError("config field 'rope_scaling.original_max_position_embeddings' must be a "
                                  f"positive integer, got {length!r}")

    # ----- derived facts -------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        """The parameter count this config implies (exact, from the shapes; no allocation)."""
        hidden, inner = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = hidden * (q_out + 2 * kv_out) + q_out * hidden
        attention += (q_out + 2 * kv_out) * self.qkv_bias + hidden * self.o_bias
        mlp = 3 * hidden * inner + (2 * inner + hidden) * self.mlp_bias
        layer = attention + mlp + 2 * hidden  # + the two RMSNorm weights
        head = 0 if self.tie_word_embeddings else self.vocab_size * hidden
        return self.vocab_size * hidden + self.num_hidden_layers * layer + hidden + head

    def check_fits(self, stored_values: int, config_source, weights_source) -> None:
        """Refuse a config that implies far more parameters than the weights file holds values,
        before anything is allocated: ``num_hidden_layers: 1000000000`` in a small folder
        would otherwise allocate until the machine runs out of memory. A smaller excess (a
        few missing tensors) is left to the exact per-key report that follows once the model
        is built: that allocation is bounded by a few times the file's size."""
        needed = self.num_parameters()
        if needed > _SLACK_FACTOR * stored_values + _SLACK_VALUES:
            raise CheckpointError(
                f"'{config_source}' describes a model of {needed:,} parameters, but '{weights_source}' holds "
                f"only {stored_values:,} values; the config does not fit the weights"
            )

    # ----- reading and writing -------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "LlamaConfig":
        raw = dict(raw)
        model_type = raw.get("model_type", "llama")
        if model_type == "mistral" and raw.get("sliding_window") is not None:
            raise ConfigError(
                "config field 'sliding_window' is set; minipeft has no sliding-window attention "
                "(set it to null to run the model with full attention)"
            )
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise ConfigError("config field 'use_sliding_window' is true; minipeft has no sliding-window attention")
        rope = raw.pop("rope_parameters", None)
        if rope is not None:  # transformers 5.x: theta and scaling in one dict
            if not isinstance(rope, dict):
                raise ConfigError(f"config field 'rope_parameters' must be an object, got {rope!r}")
            rope = dict(rope)
            raw.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raw["rope_scaling"] = rope
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except TypeError as exc:
            raise ConfigError(f"config is missing a required field: {exc}") from exc

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: file not found (a model folder needs config.json)")
        raw = read_json(path, "model config", ConfigError)  # names the file for bad UTF-8, JSON, a folder ...
        try:
            return cls.from_dict(raw)
        except (ConfigError, CheckpointError) as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict:
        """A transformers-compatible ``config.json`` dict."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out.setdefault("architectures", ["Qwen2ForCausalLM" if self.model_type == "qwen2"
                                         else "MistralForCausalLM" if self.model_type == "mistral"
                                         else "LlamaForCausalLM"])
        return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(name: str, value) -> None:
    """A finite number > 0 (a bool, a string, NaN or Infinity is refused, naming the field)."""
    try:
        finite = math.isfinite(value)  # OverflowError: an int beyond float's range
    except (TypeError, OverflowError):
        finite = False
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (finite and value > 0):
        raise ConfigError(f"config field {name!r} must be a finite number > 0, got {value!r}")
