"""The LLaMA-family decoder, module for module as Hugging Face names it.

    h₀ = E[ids]
    for each layer:  h ← h + Attn(RMSNorm(h));  h ← h + MLP(RMSNorm(h))
    logits = RMSNorm(h) W_headᵀ
    Attn(x) = softmax(RoPE(x W_qᵀ) RoPE(x W_kᵀ)ᵀ / √Dh + causal mask) (x W_vᵀ) W_oᵀ
    MLP(x)  = (silu(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ

Attribute paths equal checkpoint keys (``model.layers.3.self_attn.q_proj.weight``),
so loading is an identity map. Attention is batched over heads (no Python loop
over heads or tokens); grouped-query heads share key/value heads without copies.
"""
from __future__ import annotations

import numpy as np

from ..autograd.fused import IGNORE_INDEX, attention, cross_entropy, linear_cross_entropy, rope, silu_mul
from ..autograd.tensor import Tensor, is_grad_enabled
from ..backend import get_array_module, to_device, to_numpy
from ..errors import InputError
from ..nn import Embedding, Linear, Module, RMSNorm
from .config import LlamaConfig
from .kv_cache import KVCache
from .rope import inverse_frequencies, rope_tables


class CausalLMOutput:
    """What the model returns: ``logits`` (B, T, V), ``loss`` (with labels), ``cache``.

    In a training step (labels given, autograd recording) the loss comes from the fused
    head + loss, which never forms the logits; ``logits`` are then computed from the
    final hidden states when first read (one more product with the head's weights as they
    are at that moment), so a step that reads only the loss never pays for them.
    """

    def __init__(self, logits: Tensor | None = None, loss: Tensor | None = None,
                 cache: KVCache | None = None, *, compute_logits=None):
        self._logits, self._compute_logits = logits, compute_logits
        self.loss, self.cache = loss, cache

    @property
    def logits(self) -> Tensor | None:
        if self._logits is None and self._compute_logits is not None:
            self._logits, self._compute_logits = self._compute_logits(), None
        return self._logits


class LlamaAttention(Module):
    def __init__(self, config: LlamaConfig, layer_index: int, rng=None):
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(hidden, q_out, bias=config.qkv_bias, rng=rng)
        self.k_proj = Linear(hidden, kv_out, bias=config.qkv_bias, rng=rng)
        self.v_proj = Linear(hidden, kv_out, bias=config.qkv_bias, rng=rng)
        self.o_proj = Linear(q_out, hidden, bias=config.o_bias, rng=rng)

    def forward(self, x, cos, sin, key_padding_mask=None, cache: KVCache | None = None):
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q, k = rope(q, cos, sin), rope(k, cos, sin)  # (B, H, T, Dh), (B, Hkv, T, Dh)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # now (B, Hkv, S, Dh)
        out = attention(q, k, v, key_padding_mask)  # (B, H, T, Dh)
        out = out.transpose(0, 2, 1, 3).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out)


class LlamaMLP(Module):
    def __init__(self, config: LlamaConfig, rng=None):
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(hidden, inner, bias=bias, rng=rng)
        self.up_proj = Linear(hidden, inner, bias=bias, rng=rng)
        self.down_proj = Linear(inner, hidden, bias=bias, rng=rng)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(Module):
    """h ← h + Attn(RMSNorm(h)); h ← h + MLP(RMSNorm(h)).

    The two residual joins are attachment points: a module set as ``attention_adapters``
    (after attention, o_proj included) or ``output_adapters`` (after the MLP) is called as
    ``join(f, h)`` with the sublayer output f and the residual stream h, and returns the
    new stream in place of h + f (bottleneck adapters, AdapterFusion; the names are the
    ``adapters`` library's). Unset (the class default None), the join is h + f.
    """

    attention_adapters: Module | None = None
    output_adapters: Module | None = None

    def __init__(self, config: LlamaConfig, layer_index: int, rng=None):
        self.self_attn = LlamaAttention(config, layer_index, rng)
        self.mlp = LlamaMLP(config, rng)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, key_padding_mask=None, cache=None):
        f = self.self_attn(self.input_layernorm(h), cos, sin, key_padding_mask, cache)
        h = h + f if self.attention_adapters is None else self.attention_adapters(f, h)
        f = self.mlp(self.post_attention_layernorm(h))
        return h + f if self.output_adapters is None else self.output_adapters(f, h)


class LlamaModel(Module):
    """The decoder stack without the output head (HF's ``model.`` prefix)."""

    def __init__(self, config: LlamaConfig, rng=None):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, rng=rng)
        self.layers = [LlamaDecoderLayer(config, i, rng) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, cos, sin, key_padding_mask=None, cache=None, inputs_embeds=None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, key_padding_mask, cache)
        return self.norm(h)


class LlamaForCausalLM(Module):
    """Decoder + language-model head. ``model(input_ids, labels=...)`` as in transformers."""

    def __init__(self, config: LlamaConfig, rng: np.random.Generator | None = None):
        """Build the model; with ``rng`` weights are random (for tests), else zeros to be loaded."""
        self.config = config
        self.model = LlamaModel(config, rng)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, rng=rng)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter, two uses
        self.generation_config: dict = {}
        self._inv_freq = inverse_frequencies(config)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None,
                cache: KVCache | None = None, inputs_embeds=None) -> CausalLMOutput:
        """Logits (B, T, V) and, with ``labels`` (B, T), the mean next-token loss.

        As in transformers, labels are *not* pre-shifted: position t predicts
        label t+1, and label −100 is ignored. ``attention_mask`` (B, S) marks real
        tokens (1) and padding (0) over the cached plus new positions.
        Positions default to past_length … past_length+T−1.

        A training step needs only the loss, and the logits are its largest arrays
        (B·T·V floats): with labels, while autograd records and the head is a plain
        Linear (no adapter wraps it), the loss comes from
        :func:`~minipeft.autograd.fused.linear_cross_entropy`, which never holds them,
        and ``logits`` are computed only if read (see :class:`CausalLMOutput`).
        """
        if inputs_embeds is None:
            ids = _as_id_array(input_ids, "input_ids")
            batch, length = ids.shape
        else:
            ids, (batch, length) = None, inputs_embeds.shape[:2]
        past = cache.length if cache is not None else 0
        if length > self.config.max_position_embeddings:  # also bounds attention's (T, T) memory
            raise InputError(f"the input has {length} tokens, more than the model's max_position_embeddings "
                             f"({self.config.max_position_embeddings}); shorten it")
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past, past + length), (batch, length))
        device = self.device
        dtype = self.model.norm.weight.dtype
        cos, sin = (Tensor(to_device(t, device)) for t in rope_tables(self._inv_freq, to_numpy(position_ids), dtype))
        mask = None
        if attention_mask is not None:
            mask = to_device(_as_id_array(attention_mask, "attention_mask"), device).astype(bool)
            if mask.shape != (batch, past + length):
                raise InputError(f"attention_mask has shape {mask.shape}, expected {(batch, past + length)}")
            if bool(mask.all()):  # no padding (generation passes its mask every step): the causal
                mask = None       # mask alone, made once and shared by every layer
        if ids is not None:
            ids = to_device(ids, device)
        h = self.model(ids, cos, sin, mask, cache, inputs_embeds)
        if cache is not None:
            cache.advance(length)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(h), cache=cache)
        targets = to_device(shift_labels(_as_id_array(labels, "labels")), device)
        if is_grad_enabled() and type(self.lm_head) is Linear and self.lm_head.bias is None:
            loss = linear_cross_entropy(h, self.lm_head.weight, targets)
            return CausalLMOutput(loss=loss, cache=cache, compute_logits=lambda: self.lm_head(h))
        logits = self.lm_head(h)
        return CausalLMOutput(logits=logits, loss=cross_entropy(logits, targets), cache=cache)

    def input_embeddings(self, input_ids) -> Tensor:
        """E[ids], (B, T, hidden), for ids (B, T) checked as forward checks them (prompt tuning
        puts its virtual tokens in front of these)."""
        return self.model.embed_tokens(to_device(_as_id_array(input_ids, "input_ids"), self.device))

    def generate(self, input_ids, **kwargs) -> np.ndarray:
        """Continue each row of ``input_ids``; see :func:`minipeft.models.generation.generate`."""
        from .generation import generate  # noqa: PLC0415 - generation builds on this module

        return generate(self, input_ids, **kwargs)

    @classmethod
    def from_pretrained(cls, folder, device: str = "cpu", dtype=np.float32) -> "LlamaForCausalLM":
        """Load a Hugging Face model folder (config.json + safetensors weights)."""
        from .pretrained import load_pretrained  # noqa: PLC0415

        model = load_pretrained(cls, folder, device=device, dtype=dtype)
        model.name_or_path = str(folder)  # as transformers; PEFT records it in adapter_config.json
        return model

    def save_pretrained(self, folder, dtype=None, max_shard_bytes: int | None = None) -> None:
        """Write config.json, generation_config.json and safetensors weights transformers loads."""
        from .pretrained import save_pretrained  # noqa: PLC0415

        save_pretrained(self, folder, dtype=dtype, max_shard_bytes=max_shard_bytes)


def shift_labels(labels: np.ndarray) -> np.ndarray:
    """Labels for position t become labels[t+1]; the last position gets −100 (nothing to predict)."""
    xp = get_array_module(labels)
    pad = xp.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype)
    return xp.concatenate((labels[:, 1:], pad), axis=1)


def _as_id_array(values, what: str):
    """Validate integer ids of shape (B, T); lists and arrays are accepted."""
    if isinstance(values, Tensor):
        values = values.data
    xp = get_array_module(values)
    array = values if isinstance(values, xp.ndarray) else np.asarray(values)
    if array.ndim != 2:
        raise InputError(f"{what} must have shape (batch, length), got shape {tuple(array.shape)}")
    if array.dtype.kind == "b":
        return array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise InputError(f"{what} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)
