"""Text generation: greedy decoding and sampling with a KV cache.

One step: run the model on the new tokens (the whole prompt first, then one
token per row), take the last position's logits, pick the next token, repeat.
Sampling follows transformers' order: temperature, then top-k, then top-p
(nucleus: keep the smallest set of most likely tokens whose probability mass
reaches p). ``temperature=0`` means greedy (argmax). Random numbers come from a
host ``numpy.random.Generator`` seeded by ``seed``, so runs repeat exactly.

Batches of prompts of different lengths are *left*-padded: every row's last
prompt token sits in the last column, so one step serves all rows. Positions
count real tokens only (padding does not shift a row's RoPE positions) and
padding is masked out of attention, so a padded row decodes as it would alone.
A row stops at any stop id (``eos_token_id`` of generation_config.json, which
may be a list); finished rows are padded with ``pad_token_id``.

The loop itself (:func:`decode`) takes a next-token-logits callback, so decoders that
mix several models' logits (proxy-tuning) reuse it; :func:`model_step` is the
callback of one model with its KV cache.
"""
from __future__ import annotations

import numpy as np

from ..autograd.tensor import no_grad
from ..backend import random_generator, to_numpy
from ..errors import InputError
from .kv_cache import KVCache


def select_next_tokens(logits: np.ndarray, temperature: float = 0.0, top_k: int | None = None,
                       top_p: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Pick one token id per row of host ``logits`` (B, V)."""
    if temperature <= 0.0:
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < top_p  # the top token always stays (mass_before = 0)
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    rng = rng if rng is not None else np.random.default_rng()
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random((probs.shape[0], 1))
    # The first token whose cumulative mass exceeds the draw: a token of probability 0
    # (cut by top-k / top-p) never is, not even for a draw of 0. A draw above the rounded
    # total (1 − 1e-16) falls to the last token that can be drawn, not to the last id.
    last_possible = probs.shape[-1] - 1 - (probs[:, ::-1] > 0).argmax(axis=-1)
    return np.minimum((cumulative <= draws).sum(axis=-1), last_possible)


def stop_ids_of(model, eos_token_id=None) -> set[int]:
    """Stop ids: the argument, else generation_config.json's, else config.json's eos."""
    value = eos_token_id
    if value is None:
        value = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def check_prompt(input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Host (ids, mask) of a left-padded batch of prompts, both (B, T), or an InputError."""
    ids = np.asarray(to_numpy(input_ids), dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError(f"input_ids must have shape (batch, length ≥ 1), got {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(to_numpy(attention_mask), dtype=np.int64)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape}, expected {ids.shape}")
    if (mask[:, -1] == 0).any():
        raise InputError("prompts must be left-padded: the last column of attention_mask must be 1")
    return ids, mask


def pad_id_of(model, stop: set[int], pad_token_id: int | None = None) -> int:
    """Filler for finished rows: the argument, else config.json's pad id, else the smallest stop id, else 0."""
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    return pad if pad is not None else (min(stop) if stop else 0)


def model_step(model, use_cache: bool = True):
    """The next-token-logits callback of one model for :func:`decode`: it keeps the model's
    own KV cache (or none) and returns the last position's logits, host (B, V)."""
    cache = KVCache(model.config.num_hidden_layers) if use_cache else None

    def step(step_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = model(step_ids, attention_mask=mask, position_ids=positions, cache=cache)
        return to_numpy(out.logits.data[:, -1, :])

    return step


def decode(next_logits, ids: np.ndarray, mask: np.ndarray, stop: set[int], pad: int, max_new_tokens: int = 64,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed=None,
           use_cache: bool = True) -> np.ndarray:
    """The decoding loop, for any source of next-token logits.

    ``next_logits(step_ids, mask, positions)`` returns host logits (B, V) of the last
    position. With ``use_cache`` it receives only the new tokens (the whole prompt first,
    then one per row) and must remember the past itself; without, the whole sequence
    every step. ``mask`` always covers the whole sequence; ``positions`` match
    ``step_ids`` and count real tokens only. ``ids`` / ``mask`` come from
    :func:`check_prompt`.
    """
    rng = random_generator(seed)
    batch = ids.shape[0]
    finished = np.zeros(batch, dtype=bool)
    step_ids = ids
    with no_grad():
        for _ in range(max_new_tokens):
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            if use_cache:
                positions = positions[:, -step_ids.shape[1]:]
            last = next_logits(step_ids, mask, positions)
            chosen = select_next_tokens(last, temperature, top_k, top_p, rng)
            chosen = np.where(finished, pad, chosen)
            finished |= np.isin(chosen, list(stop))
            ids = np.concatenate((ids, chosen[:, None]), axis=1)
            mask = np.concatenate((mask, np.ones((batch, 1), dtype=mask.dtype)), axis=1)
            step_ids = chosen[:, None] if use_cache else ids
            if finished.all():
                break
    return ids


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed=None, eos_token_id=None,
             pad_token_id: int | None = None, use_cache: bool = True) -> np.ndarray:
    """Return host ids (B, T + n) with n ≤ ``max_new_tokens`` new tokens per row.

    Generation ends early when every row has produced a stop id. With
    ``use_cache=False`` every step recomputes the whole sequence (slow; the
    reference the KV cache is tested against).
    """
    ids, mask = check_prompt(input_ids, attention_mask)
    stop = stop_ids_of(model, eos_token_id)
    pad = pad_id_of(model, stop, pad_token_id)
    return decode(model_step(model, use_cache), ids, mask, stop, pad, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, use_cache=use_cache)
