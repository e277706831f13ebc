"""Virtual tokens: the plumbing of the methods that add inputs the model never saw as tokens.

A method row with ``prompt_embeddings`` (prompt tuning) or ``prefix_key_values`` (prefix
tuning) is run by :func:`forward_with_virtual_tokens`, for training, plain calls and
generation alike; the method supplies only the vectors (core/method.py):

* prompt tuning: ``inputs_embeds = [P prompt vectors; E[ids]]``, the attention mask and the
  labels prefixed with P ones / P × −100, real tokens at positions P..P+T−1; the logits
  cover the P virtual positions too (B, P + T, V), as PEFT's do;
* prefix tuning: per layer P keys and values in front of the sequence's own, written into
  the KV cache first (a fresh one when the caller gives none), the mask prefixed with ones,
  real tokens at positions P..P+T−1; logits (B, T, V).

In generation the virtual tokens go in with the first step only (the cache is empty): after
that they live in the cache. Positions given by the caller (generation passes those of the
real tokens, counting real tokens only) are shifted past the P virtual ones.
"""
from __future__ import annotations

import numpy as np

from ...autograd import ops
from ...autograd.fused import IGNORE_INDEX
from ...autograd.tensor import Tensor
from ...backend import to_device, to_numpy
from ...errors import ConfigError
from ...models.kv_cache import KVCache
from . import registry


def virtual_token_adapter(peft_model):
    """(method, name) of the active adapter that adds virtual tokens (prompt / prefix
    tuning), or None; only one may run at a time (as in PEFT)."""
    if peft_model.state.disabled:
        return None
    found = [(m, n) for n in peft_model.state.active if n in peft_model.peft_config
             for m in [registry.get_method(peft_model.peft_config[n].peft_type)]
             if m.prompt_embeddings is not None or m.prefix_key_values is not None]
    if len(found) > 1:
        raise ConfigError(f"adapters {[n for _, n in found]} each add virtual tokens; only one can be active")
    return found[0] if found else None


def forward_with_virtual_tokens(peft_model, method, name: str, input_ids, attention_mask, labels,
                                position_ids=None, cache=None, inputs_embeds=None):
    """The forward with adapter ``name``'s virtual tokens: the plumbing of the docstring."""
    model = peft_model.base_model.model
    first = cache is None or cache.length == 0  # virtual tokens go in once, then live in the cache
    batch = inputs_embeds.shape[0] if inputs_embeds is not None else len(input_ids)
    count, own_cache = peft_model.peft_config[name].num_virtual_tokens, None
    if method.prompt_embeddings is not None:
        if inputs_embeds is None:
            inputs_embeds = model.input_embeddings(input_ids)
        if first:
            prompts = method.prompt_embeddings(peft_model, name, batch)  # (B, P, hidden)
            inputs_embeds = ops.concat([prompts, inputs_embeds], axis=1)
        input_ids = None
    else:
        if cache is None:
            cache = own_cache = KVCache(model.config.num_hidden_layers)
        if first:
            for layer, (keys, values) in enumerate(method.prefix_key_values(peft_model, name, batch)):
                cache.update(layer, keys, values)
            cache.advance(count)
    device, added = model.device, count if (first and method.prompt_embeddings is not None) else 0
    if attention_mask is not None:  # the virtual positions are real: every token may read them
        mask = to_numpy(attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask)
        attention_mask = np.concatenate([np.ones((mask.shape[0], count), dtype=np.int64), mask], axis=1)
    if labels is not None and added:
        labels = to_numpy(labels.data if isinstance(labels, Tensor) else labels)
        labels = np.concatenate([np.full((labels.shape[0], added), IGNORE_INDEX, dtype=np.int64), labels], axis=1)
    if position_ids is not None:  # positions of real tokens (generation passes them): shifted past the P
        positions = np.asarray(to_numpy(position_ids)) + count
        if added:
            positions = np.concatenate([np.broadcast_to(np.arange(count), (positions.shape[0], count)),
                                        positions], axis=1)
        position_ids = positions
    out = model(None if input_ids is None else to_device(np.asarray(to_numpy(input_ids)), device),
                attention_mask=attention_mask, labels=labels, position_ids=position_ids, cache=cache,
                inputs_embeds=inputs_embeds)
    if own_cache is not None:
        out.cache = None  # a cache made for this call only
    return out
