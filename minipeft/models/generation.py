"""Text generation: greedy decoding and sampling with a KV cache, with transformers' options.

One step: run the model on the new tokens (the whole prompt first, then one
token per row), take the last position's logits, pick the next token, repeat.
The logits pass through transformers' processors in transformers' order:
repetition penalty (Keskar et al., 2019: a token already in the row has its
logit divided by the penalty when positive, multiplied when negative), then, when
sampling, temperature, top-k, and top-p (nucleus: keep the smallest set of most
likely tokens whose probability mass reaches p). Random numbers come from a host
``numpy.random.Generator`` seeded by ``seed``, so runs repeat exactly.

Greedy or sampling (the rule, and where it departs from transformers):
* ``do_sample=True`` samples and ``do_sample=False`` is greedy, as in transformers;
  with ``do_sample=True`` the defaults are transformers' (temperature 1.0, top_k 50,
  top_p 1.0) and ``temperature=0`` is refused, as transformers refuses it;
* ``do_sample=None`` (the default) keeps minipeft's older rule, which is also
  llama.cpp's: a ``temperature`` > 0 samples (no top-k unless given), none or 0 is
  greedy. transformers would decode greedily and warn for ``temperature=0.8`` alone;
* top_k / top_p / temperature given to greedy decoding are ignored with a
  ``UserWarning`` naming them (transformers warns too), never silently;
* invalid values raise an :class:`~minipeft.errors.InputError` (a ``ValueError``)
  naming the argument: ``top_p`` outside (0, 1], a negative ``temperature``,
  ``top_k`` < 0 (0 switches top-k off, as in transformers), ``repetition_penalty``
  ≤ 0, ``max_new_tokens`` < 0, ``num_return_sequences`` < 1, and
  ``num_return_sequences`` > 1 with greedy decoding (every copy would be the same row;
  transformers refuses it too).

``num_return_sequences=n`` repeats each prompt row n times, consecutively, as
transformers' ``repeat_interleave`` does: the result has B·n rows. A streamer sees
each step's new tokens: a callable gets the (B·n,) ids, an object with ``put`` /
``end`` (transformers' streamer protocol, so its ``TextStreamer`` works) gets the
prompt first, then the (B·n,) ids of each step, then ``end()``; :func:`stream` is the
same as a generator.

Batches of prompts of different lengths are *left*-padded: every row's last
prompt token sits in the last column, so one step serves all rows. Positions
count real tokens only (padding does not shift a row's RoPE positions) and
padding is masked out of attention, so a padded row decodes as it would alone;
for the same reason padding does not count as "already in the row" for the
repetition penalty (transformers counts it). A row stops at any stop id
(``eos_token_id`` of generation_config.json, which may be a list); finished rows
are padded with ``pad_token_id``. Only ``eos_token_id`` is read from
generation_config.json: its sampling settings are not applied (transformers
applies them), so a model is greedy unless asked.

A row that grows past the model's ``max_position_embeddings`` runs on positions
the model was not trained on: ``past_max_positions="warn"`` (the default) says so
once and goes on, ``"stop"`` ends generation when the longest row fills the window
(so every token of the result has a position the model knows). transformers warns
the same way. A prompt longer than the window is the model's to refuse (InputError).

The loop itself (:func:`decode`) takes a next-token-logits callback, so decoders that
mix several models' logits (proxy-tuning) reuse it; :func:`model_step` is the
callback of one model with its KV cache.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from ..autograd.tensor import no_grad
from ..backend import random_generator, to_numpy
from ..errors import InputError
from .kv_cache import KVCache
from .prompt_cache import PromptCache
from .stop_strings import StopStrings

TRANSFORMERS_TOP_K = 50  # GenerationConfig's default top_k, used with do_sample=True
PAST_MAX_POSITIONS = ("warn", "stop")


@dataclasses.dataclass(frozen=True)
class DecodingOptions:
    """How each next token is chosen, after :func:`decoding_options` checked and resolved the arguments."""
    do_sample: bool
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0


def _number(value, name: str, integer: bool = False):
    """``value`` as a finite int / float, or an InputError naming the argument."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kinds):
        raise InputError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value!r}")
    return int(value) if integer else float(value)


def decoding_options(do_sample=None, temperature=None, top_k=None, top_p=None, repetition_penalty=1.0,
                     num_return_sequences: int = 1, max_new_tokens: int = 64) -> DecodingOptions:
    """Check the generation arguments (InputError naming the one at fault), warn about the ones
    greedy decoding ignores, and resolve greedy vs sampling by the rule of the module docstring."""
    if do_sample is not None and not isinstance(do_sample, (bool, np.bool_)):
        raise InputError(f"do_sample must be True, False or None, got {do_sample!r}")
    if _number(max_new_tokens, "max_new_tokens", integer=True) < 0:
        raise InputError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    if _number(num_return_sequences, "num_return_sequences", integer=True) < 1:
        raise InputError(f"num_return_sequences must be ≥ 1, got {num_return_sequences}")
    if temperature is not None and _number(temperature, "temperature") < 0:
        raise InputError(f"temperature must be ≥ 0 (0: greedy), got {temperature}")
    if top_k is not None and _number(top_k, "top_k", integer=True) < 0:
        raise InputError(f"top_k must be ≥ 0 (0: no top-k filter), got {top_k}")
    if top_p is not None and not 0.0 < _number(top_p, "top_p") <= 1.0:
        raise InputError(f"top_p must be in (0, 1] (1: no nucleus filter), got {top_p}")
    if _number(repetition_penalty, "repetition_penalty") <= 0:
        raise InputError(f"repetition_penalty must be > 0 (1.0: no penalty), got {repetition_penalty}")

    sampling = bool(do_sample) if do_sample is not None else (temperature is not None and temperature > 0)
    if sampling and do_sample and temperature is not None and temperature == 0:
        raise InputError("temperature=0 with do_sample=True would divide the logits by zero; "
                         "for greedy decoding pass do_sample=False")
    if not sampling:
        ignored = {"temperature": temperature if do_sample is not None and temperature not in (None, 1.0) else None,
                   "top_k": top_k or None, "top_p": top_p if top_p != 1.0 else None}
        ignored = {name: value for name, value in ignored.items() if value is not None}
        if ignored:
            given = ", ".join(f"{name}={value}" for name, value in ignored.items())
            warnings.warn(f"greedy decoding ignores {given}: pass do_sample=True to sample", UserWarning,
                          stacklevel=3)
        if num_return_sequences > 1:
            raise InputError(f"num_return_sequences={num_return_sequences} needs sampling (do_sample=True): "
                             "greedy decoding would return the same sequence every time")
        return DecodingOptions(do_sample=False, repetition_penalty=float(repetition_penalty))
    if top_k is None and do_sample:
        top_k = TRANSFORMERS_TOP_K
    return DecodingOptions(do_sample=True, temperature=1.0 if temperature is None else float(temperature),
                           top_k=top_k or None, top_p=top_p, repetition_penalty=float(repetition_penalty))


def penalize_repetitions(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor on host logits (B, V): a token already in
    the row (``seen``, bool (B, V)) gets z / penalty when z > 0 and z · penalty otherwise, in the
    logits' own float32 arithmetic (so argmax ties break as in torch)."""
    if penalty == 1.0:
        return logits
    p = logits.dtype.type(penalty)
    return np.where(seen, np.where(logits < 0, logits * p, logits / p), logits)


def select_next_tokens(logits: np.ndarray, temperature: float = 0.0, top_k: int | None = None,
                       top_p: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Pick one token id per row of host ``logits`` (B, V); ``temperature`` ≤ 0 is argmax."""
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


def _window_check(mask: np.ndarray, max_positions: int | None, policy: str, use_cache: bool,
                  warned: bool) -> tuple[bool, bool]:
    """(stop now, warned): whether the next token would sit past ``max_positions``, by ``policy``.
    Without the KV cache the whole sequence goes in again, and the model refuses an input longer
    than its window, so there "warn" warns and stops."""
    if max_positions is None or mask.sum(axis=1).max() < max_positions:
        return False, warned
    if policy == "warn" and not warned:
        warnings.warn(f"generation goes past the model's max_position_embeddings ({max_positions}): later "
                      "tokens sit on positions it was not trained on and quality drops; pass "
                      "past_max_positions='stop' to stop there", UserWarning, stacklevel=4)
    return policy == "stop" or not use_cache, True


def iter_decode(next_logits, ids: np.ndarray, mask: np.ndarray, stop: set[int], pad: int, max_new_tokens: int = 64,
                temperature=None, top_k: int | None = None, top_p: float | None = None, seed=None,
                use_cache: bool = True, *, do_sample=None, repetition_penalty: float = 1.0,
                num_return_sequences: int = 1, max_positions: int | None = None, past_max_positions: str = "warn",
                stop_strings=None, tokenizer=None):
    """The decoding loop as a generator: yields (new ids (B·n,), all ids (B·n, T + k)) per step.

    ``next_logits(step_ids, mask, positions)`` returns host logits (B, V) of the last
    position. With ``use_cache`` it receives only the new tokens (the whole prompt first,
    then one per row) and must remember the past itself; without, the whole sequence
    every step. ``mask`` always covers the whole sequence; ``positions`` match
    ``step_ids`` and count real tokens only. ``ids`` / ``mask`` come from
    :func:`check_prompt`. The other arguments are :func:`generate`'s.
    """
    options = decoding_options(do_sample, temperature, top_k, top_p, repetition_penalty, num_return_sequences,
                               max_new_tokens)
    if past_max_positions not in PAST_MAX_POSITIONS:
        raise InputError(f"past_max_positions must be one of {PAST_MAX_POSITIONS}, got {past_max_positions!r}")
    stopper = StopStrings(stop_strings, tokenizer) if stop_strings is not None else None
    if num_return_sequences > 1:
        ids, mask = np.repeat(ids, num_return_sequences, axis=0), np.repeat(mask, num_return_sequences, axis=0)
    # Checked here, before the first step: a plain function returning the generator below.
    return _steps(next_logits, ids, mask, stop, pad, max_new_tokens, options, random_generator(seed), use_cache,
                  max_positions, past_max_positions, stopper)


def _steps(next_logits, ids, mask, stop, pad, max_new_tokens, options, rng, use_cache, max_positions, policy,
           stopper=None):
    batch = ids.shape[0]
    finished = np.zeros(batch, dtype=bool)
    seen = None  # (B, V) bool: tokens already in each row, for the repetition penalty
    warned = False
    step_ids = ids
    with no_grad():
        for _ in range(max_new_tokens):
            stop_now, warned = _window_check(mask, max_positions, policy, use_cache, warned)
            if stop_now:
                break
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            if use_cache:
                positions = positions[:, -step_ids.shape[1]:]
            last = next_logits(step_ids, mask, positions)
            if options.repetition_penalty != 1.0:
                if seen is None:  # the prompt's real tokens (padding excluded); ids were checked by the model
                    seen = np.zeros(last.shape, dtype=bool)
                    rows, cols = np.nonzero(mask)
                    seen[rows, ids[rows, cols]] = True
                last = penalize_repetitions(last, seen, options.repetition_penalty)
            chosen = select_next_tokens(last, options.temperature if options.do_sample else 0.0,
                                        options.top_k, options.top_p, rng)
            chosen = np.where(finished, pad, chosen)
            if seen is not None:
                seen[np.arange(batch)[~finished], chosen[~finished]] = True
            running = ~finished
            finished |= np.isin(chosen, list(stop))
            ids = np.concatenate((ids, chosen[:, None]), axis=1)
            mask = np.concatenate((mask, np.ones((batch, 1), dtype=mask.dtype)), axis=1)
            if stopper is not None:
                finished |= stopper.ended(ids, mask, running & ~finished)
            step_ids = chosen[:, None] if use_cache else ids
            yield chosen, ids
            if finished.all():
                break


def decode(next_logits, ids: np.ndarray, mask: np.ndarray, stop: set[int], pad: int, max_new_tokens: int = 64,
           temperature=None, top_k: int | None = None, top_p: float | None = None, seed=None,
           use_cache: bool = True, *, streamer=None, **options) -> np.ndarray:
    """Run :func:`iter_decode` to the end, feeding ``streamer``; host ids (B·n, T + k)."""
    steps = iter_decode(next_logits, ids, mask, stop, pad, max_new_tokens, temperature, top_k, top_p, seed,
                        use_cache, **options)
    out = np.repeat(ids, options.get("num_return_sequences", 1), axis=0)
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(out)
    for chosen, out in steps:
        if streamer is not None:
            (streamer.put if hasattr(streamer, "put") else streamer)(chosen)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return out


def _prepare(model, input_ids, attention_mask, eos_token_id, pad_token_id, use_cache, prompt_cache=None,
             num_return_sequences: int = 1):
    ids, mask = check_prompt(input_ids, attention_mask)
    stop = stop_ids_of(model, eos_token_id)
    if prompt_cache is None:
        step = model_step(model, use_cache)
    elif isinstance(prompt_cache, PromptCache):
        step = prompt_cache.next_logits(model, ids, mask, num_return_sequences, use_cache)
    else:
        raise InputError(f"prompt_cache must be a minipeft PromptCache (or None), got {type(prompt_cache).__name__}")
    return step, ids, mask, stop, pad_id_of(model, stop, pad_token_id)


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 64, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed=None, eos_token_id=None,
             pad_token_id: int | None = None, use_cache: bool = True, *, do_sample: bool | None = None,
             repetition_penalty: float = 1.0, num_return_sequences: int = 1, streamer=None,
             past_max_positions: str = "warn", prompt_cache=None, stop_strings=None, tokenizer=None) -> np.ndarray:
    """Return host ids (B·n, T + k) with k ≤ ``max_new_tokens`` new tokens per row.

    The arguments mean what they mean in transformers' ``generate`` (greedy unless
    ``do_sample=True``; the older ``temperature > 0`` also samples, see the module
    docstring). Generation ends early when every row has produced a stop id. With
    ``use_cache=False`` every step recomputes the whole sequence (slow; the reference
    the KV cache is tested against). ``streamer``: a callable given each step's new ids
    (B·n,), or an object with transformers' ``put`` / ``end``. ``prompt_cache``: a
    :class:`~minipeft.models.prompt_cache.PromptCache` kept across calls, so a prompt that
    repeats the previous call's tokens (a chat's history) is not computed again.
    ``stop_strings`` (with the ``tokenizer`` that decodes the ids) end a row once its text
    contains one of them, as in transformers (:mod:`~minipeft.models.stop_strings`).
    """
    step, ids, mask, stop, pad = _prepare(model, input_ids, attention_mask, eos_token_id, pad_token_id, use_cache,
                                          prompt_cache, num_return_sequences)
    return decode(step, ids, mask, stop, pad, max_new_tokens, temperature, top_k, top_p, seed, use_cache,
                  streamer=streamer, do_sample=do_sample, repetition_penalty=repetition_penalty,
                  num_return_sequences=num_return_sequences, past_max_positions=past_max_positions,
                  stop_strings=stop_strings, tokenizer=tokenizer,
                  max_positions=model.config.max_position_embeddings)


def stream(model, input_ids, attention_mask=None, max_new_tokens: int = 64, eos_token_id=None,
           pad_token_id: int | None = None, use_cache: bool = True, prompt_cache=None, **options):
    """:func:`generate` as a generator: yields each step's new ids, host (B·n,), as they are chosen.

    ``options`` are :func:`generate`'s (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``num_return_sequences``, ``seed``, ``past_max_positions``,
    ``stop_strings``, ``tokenizer``) and ``prompt_cache`` are :func:`generate`'s.
    """
    step, ids, mask, stop, pad = _prepare(model, input_ids, attention_mask, eos_token_id, pad_token_id, use_cache,
                                          prompt_cache, options.get("num_return_sequences", 1))
    steps = iter_decode(step, ids, mask, stop, pad, max_new_tokens, use_cache=use_cache,
                        max_positions=model.config.max_position_embeddings, **options)  # checks the options now
    return (chosen for chosen, _ in steps)
