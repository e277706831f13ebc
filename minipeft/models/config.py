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
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"config field 'rms_norm_eps' must be > 0, got {self.rms_norm_eps!r}")
        if self.rope_scaling is not None:
            kind = self.rope_type
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"config field 'rope_scaling' has rope_type {kind!r}; supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            if kind != "default" and "factor" not in self.rope_scaling:
                raise ConfigError(f"config field 'rope_scaling' of type {kind!r} needs a 'factor'")
            if kind == "llama3":
                for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key not in self.rope_scaling:
                        raise ConfigError(f"config field 'rope_scaling' of type 'llama3' needs {key!r}")

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
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: file not found (a model folder needs config.json)") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

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
