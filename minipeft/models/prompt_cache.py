"""Keys and values kept from one ``generate`` call to the next: a chat re-reads only its new part.

A chat's prompt at turn n is the conversation so far; turn n − 1 already ran the model on most of
it (its prompt, then its reply one token at a time). A :class:`PromptCache` keeps that KV cache
and the token ids it holds; the next call with ``generate(..., prompt_cache=cache)`` keeps the
longest common prefix of those ids and the new prompt, drops the rest, and runs the model on the
new prompt's remaining tokens only (always at least its last one: the first step needs the last
position's logits). What the previous reply became when the chat template rendered it again may
differ from the tokens generated (stripped spaces, another tokenization of the same text); the
prefix simply ends there. The logits equal a fresh prefill's up to float32 rounding (the same
positions, keys and values; only the grouping of rows in the matrix products differs).

Like transformers' ``past_key_values`` passed back into ``generate`` (its "prefix caching") and
llama.cpp's prompt cache, it serves one sequence at a time: batch 1, one returned sequence, the
KV cache on, and a model whose forward depends on the tokens alone (adapters such as LoRA are
fine; prompt / prefix tuning add virtual tokens to the cache and are refused).
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..errors import InputError
from .kv_cache import KVCache
from .llama import LlamaForCausalLM


class PromptCache:
    """Pass the same object to successive ``generate`` / ``stream`` calls of one model.

    ``reused``: how many prompt tokens the last call took from the cache instead of computing.
    The keys and values are the model's as it was: after changing its weights (a training step,
    ``merge_adapter``, another active adapter) call :meth:`clear`. Another model, or the same one
    moved to another device, starts the cache afresh by itself."""

    def __init__(self):
        self.model = None  # the model whose keys and values are held
        self.device = None  # and where it ran
        self.cache: KVCache | None = None
        self.ids = np.zeros(0, dtype=np.int64)  # the tokens the cache holds, in position order
        self.reused = 0

    def clear(self) -> None:
        self.model, self.device, self.cache = None, None, None
        self.ids, self.reused = np.zeros(0, dtype=np.int64), 0

    def next_logits(self, model, ids: np.ndarray, mask: np.ndarray, num_return_sequences: int, use_cache: bool):
        """The next-token-logits callback of :func:`.generation.decode` for ``model`` on this cache,
        after checking that the call is one it can serve."""
        if ids.shape[0] != 1 or num_return_sequences != 1:
            raise InputError(f"prompt_cache serves one sequence at a time: got {ids.shape[0]} prompt row(s) "
                             f"and num_return_sequences={num_return_sequences}")
        if not use_cache:
            raise InputError("prompt_cache needs use_cache=True (it is a KV cache)")
        if not mask.all():
            raise InputError("prompt_cache takes a prompt without padding")
        if not serves(model):
            raise InputError("prompt_cache serves a LlamaForCausalLM, or a PeftModel over one without virtual "
                             "tokens (prompt / prefix tuning put them in the cache before the prompt)")
        device = getattr(model, "device", None)
        if model is not self.model or device != self.device:
            self.clear()
            self.model, self.device, self.cache = model, device, KVCache(model.config.num_hidden_layers)
        first = True

        def step(step_ids: np.ndarray, step_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
            nonlocal first
            if first:  # the whole prompt: keep what the cache already holds of it
                first = False
                keep = common_prefix(self.ids, step_ids[0, :-1])
                self.cache.truncate(keep)
                self.ids, self.reused = self.ids[:keep], keep
                step_ids, positions = step_ids[:, keep:], positions[:, keep:]
            out = model(step_ids, attention_mask=step_mask, position_ids=positions, cache=self.cache)
            self.ids = np.concatenate((self.ids, np.asarray(step_ids[0], dtype=np.int64)))
            return to_numpy(out.logits.data[:, -1, :])

        return step


def serves(model) -> bool:
    """Whether a PromptCache can serve ``model``: a LlamaForCausalLM, or a PeftModel over one whose
    active adapter adds no virtual tokens (not proxy-tuning: three models, three caches)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    virtual = getattr(model, "virtual_token_adapter", None)
    return isinstance(base, LlamaForCausalLM) and (virtual is None or virtual() is None)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading entries ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n
