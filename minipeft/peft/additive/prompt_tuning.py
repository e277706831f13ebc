"""Prompt tuning (Lester, Al-Rfou & Constant, 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", arXiv:2104.08691), as Hugging Face PEFT 0.21 runs it on a causal LM
(tuners/prompt_tuning, peft_model.py PeftModelForCausalLM).

P trainable "soft prompt" vectors go in front of the embedded input (§2, [P_e; X_e]):

    X' = [P_e ; E[x]]          P_e: (P, d) trainable,  E[x]: (B, T, d),  X': (B, P + T, d)

with d = token_dim = hidden_size. PeftModel._forward_virtual does the plumbing: the attention
mask gets P leading ones, the labels P leading −100 (no loss on virtual positions), the real
tokens sit at positions P..P+T−1, and the logits cover all P + T positions (B, P + T, V), as
PEFT's do; in generation the prompt goes in with the first step only and lives in the KV cache.

Initialisation (``prompt_tuning_init``, §3.2):
* RANDOM: P_e ~ N(0, 1) (torch's nn.Embedding default);
* TEXT: the tokenizer at ``tokenizer_name_or_path`` encodes ``prompt_tuning_init_text`` with its
  special tokens (a LLaMA tokenizer adds BOS, as PEFT's ``tokenizer(text)["input_ids"]`` does);
  the ids are cut to P or repeated ⌈P / n⌉ times and cut, and P_e = E[ids];
* SAMPLE_VOCAB: P_e = E[ids] for P ids drawn uniformly from [0, vocab_size).
A loaded adapter (inference_mode, or any load) skips TEXT / SAMPLE_VOCAB: its file brings P_e.

Parameters: P·d (PEFT's table is (P·num_transformer_submodules, d); 1 submodule here).
Not the identity at init: every real token attends to P extra positions and sits P later.
Merge: none (P_e is an input, not a weight update); merging is refused.

Files (PEFT's): one tensor ``prompt_embeddings`` (P, d), no module path in the key.

Departures from PEFT: PEFT refuses ``is_trainable=True`` for prompt-learning adapters; here one
loads trainable. The tokenizer is a local folder with ``tokenizer.json`` (minipeft's Tokenizer;
``tokenizer_kwargs`` must stay null). P_e is stored in the model's dtype (PEFT: float32, cast to
the embeddings' dtype in the forward). SAMPLE_VOCAB draws from the PeftModel's generator, not
torch's. Left-padded generation counts positions over real tokens only, so a padded row decodes as
it would alone; PEFT ignores position ids for prompt tuning and counts padding too (its plain
forward, which both sides run with positions 0..P+T−1, agrees). Only num_transformer_submodules
= 1 (decoder-only) and task_type CAUSAL_LM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ...autograd import ops
from ...backend import to_device, to_numpy
from ...errors import ConfigError
from ...nn import Parameter, ParameterGroup, init
from ..core.base import AdapterHolder, ParameterDict
from ..core.config import BaseConfig, _is_int
from ..core.method import CliOption, CliSpec, PeftMethod

TABLE_KEY = "prompt_embeddings"  # PEFT's one key for prompt-learning adapters
INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass(frozen=True)
class PromptTuningConfig(BaseConfig):
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    PEFT_FIXED: ClassVar[dict] = {"modules_to_save": None, "tokenizer_kwargs": None}

    num_virtual_tokens: int | None = None  # P
    token_dim: int | None = None  # d = hidden_size (None: from the model, as PEFT)
    num_transformer_submodules: int | None = None  # 1 for a decoder-only model
    num_attention_heads: int | None = None  # (None: from the model; unused by prompt tuning)
    num_layers: int | None = None  # (None: from the model; unused by prompt tuning)
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def __post_init__(self):
        super().__post_init__()
        self._require("task_type", self.task_type == "CAUSAL_LM", "must be 'CAUSAL_LM' (prompt tuning runs in "
                      "a causal LM)")
        self._require("num_virtual_tokens", _is_int(self.num_virtual_tokens) and self.num_virtual_tokens > 0,
                      "must be a positive integer")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            self._require(name, value is None or (_is_int(value) and value > 0), "must be a positive integer or null")
        self._require("num_transformer_submodules", self.num_transformer_submodules in (None, 1),
                      "must be 1 (a decoder-only model)")
        self._require("prompt_tuning_init", self.prompt_tuning_init in INITS, f"must be one of {INITS}")
        for name in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
            value = getattr(self, name)
            self._require(name, value is None or isinstance(value, str), "must be a string or null")
        if self.prompt_tuning_init == "TEXT":  # PEFT's checks
            self._require("tokenizer_name_or_path", bool(self.tokenizer_name_or_path),
                          "must name a tokenizer folder when prompt_tuning_init is 'TEXT'")
            self._require("prompt_tuning_init_text", self.prompt_tuning_init_text is not None,
                          "must be set when prompt_tuning_init is 'TEXT'")

    def for_model(self, model) -> "PromptTuningConfig":
        """PEFT's _prepare_prompt_learning_config for LLaMA: d = hidden_size, L, H; given sizes must fit."""
        c = model.config
        sizes = {"token_dim": c.hidden_size, "num_layers": c.num_hidden_layers,
                 "num_attention_heads": c.num_attention_heads, "num_transformer_submodules": 1}
        for name, value in sizes.items():
            self._require(name, getattr(self, name) in (None, value), f"must be {value} for this model "
                          "(the adapter was made for another model?)")
        return self.replace(**sizes)

    def for_loading(self) -> "PromptTuningConfig":
        """A loaded adapter brings P_e: no tokenizer, no vocabulary draw (PEFT's inference_mode)."""
        return self.replace(prompt_tuning_init="RANDOM")


class PromptEncoder(AdapterHolder):
    """The soft prompts of every adapter, at ``model.prompt_encoder``: ``embedding.<adapter>``, (P, d)."""

    def __init__(self):
        super().__init__()
        self.embedding = ParameterDict()

    def adapter_names(self) -> list[str]:
        return self.embedding.keys()

    def adapter_state(self, name: str) -> dict:
        return {TABLE_KEY: self.embedding[name]}

    def delete_adapter(self, name: str) -> None:
        if name in self.embedding:
            del self.embedding[name]

    def file_key(self, path: str, key: str) -> str:
        return key  # prompt-learning keys carry no module path in PEFT's files


def init_ids(config: PromptTuningConfig, vocab_size: int, rng) -> np.ndarray | None:
    """The token ids whose embeddings start P_e (TEXT, SAMPLE_VOCAB), or None for RANDOM."""
    P = config.num_virtual_tokens
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":
        return None
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return rng.integers(0, vocab_size, P)
    from ...io.tokenizer import Tokenizer  # noqa: PLC0415 - only TEXT init needs the tokenizers package

    folder = Path(config.tokenizer_name_or_path)
    if not folder.is_dir():
        raise ConfigError(f"PromptTuningConfig field 'tokenizer_name_or_path' must be a local tokenizer folder "
                          f"(minipeft downloads nothing), got {config.tokenizer_name_or_path!r}")
    ids = Tokenizer.from_pretrained(folder).encode(config.prompt_tuning_init_text)  # with BOS, as PEFT
    if not ids:
        raise ConfigError("PromptTuningConfig field 'prompt_tuning_init_text' encodes to no tokens")
    if max(ids) >= vocab_size:
        raise ConfigError(f"PromptTuningConfig field 'tokenizer_name_or_path': token id {max(ids)} is outside the "
                          f"model's vocabulary ({vocab_size}): a tokenizer of another model?")
    return np.array((ids * math.ceil(P / len(ids)))[:P])  # cut, or repeated and cut, to P


def apply(model, config: PromptTuningConfig, rng, adapter_name: str = "default") -> ParameterGroup:
    """Attach (or extend) ``model.prompt_encoder`` with adapter ``adapter_name``'s prompt P_e."""
    config = config.for_model(model)
    embed = model.model.embed_tokens.weight
    ids = init_ids(config, embed.shape[0], rng)
    if ids is None:
        table = init.normal((config.num_virtual_tokens, config.token_dim), rng, std=1.0, dtype=embed.dtype)
    else:
        table = to_numpy(embed.data)[ids].copy()
    if not isinstance(getattr(model, "prompt_encoder", None), PromptEncoder):
        model.prompt_encoder = PromptEncoder()
    model.prompt_encoder.embedding[adapter_name] = Parameter(to_device(table, embed.device))
    model.prompt_encoder.active_adapters = [adapter_name]
    return ParameterGroup(f"prompt:{adapter_name}", [model.prompt_encoder.embedding[adapter_name]])


def prompt_embeddings(peft_model, name: str, batch_size: int):
    """P_e repeated over the batch, (B, P, d): PEFT's get_prompt."""
    table = peft_model.base_model.model.prompt_encoder.embedding[name]  # (P, d)
    return ops.concat([table.reshape(1, *table.shape)] * batch_size, axis=0)


# ----- the method's row in the table, and its command line ---------------------------------
TOKENS = CliOption(("--prompt-tokens",), dict(type=int, default=8,
                                                    help="prompt tuning: virtual tokens P (default 8)"))
INIT = CliOption(("--prompt-init",), dict(choices=["random", "text", "sample_vocab"], default="random",
                                          help="P_e from N(0, 1), from the embeddings of --prompt-init-text, "
                                               "or of random vocabulary tokens (default random)"))
INIT_TEXT = CliOption(("--prompt-init-text",), dict(default=None, metavar="TEXT",
                                                    help="text for --prompt-init text (the model's tokenizer)"))


def cli_config(args) -> PromptTuningConfig:
    init_kind = args.prompt_init.upper()
    tokenizer = None
    if init_kind == "TEXT":
        from ...data import bundled_model_path  # noqa: PLC0415 - the CLI's default model

        tokenizer = str(Path(args.model or bundled_model_path()).resolve())
    return PromptTuningConfig(num_virtual_tokens=args.prompt_tokens, prompt_tuning_init=init_kind,
                              prompt_tuning_init_text=args.prompt_init_text, tokenizer_name_or_path=tokenizer)


METHOD = PeftMethod(
    "PROMPT_TUNING", PromptTuningConfig, apply, PromptEncoder, "prompt", mergeable=False,
    prompt_embeddings=prompt_embeddings,
    cli=CliSpec({"prompt": cli_config}, (TOKENS, INIT, INIT_TEXT), "prompt tuning"))
