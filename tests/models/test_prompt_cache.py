"""PromptCache: a prompt that repeats what the previous generate call ran is not computed again,
and nothing else changes: the logits equal a fresh prefill's, greedy ids a fresh call's; what it
cannot serve is refused by name."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.errors import InputError
from minipeft.models.kv_cache import KVCache
from minipeft.models.prompt_cache import common_prefix

VOCAB = 96  # TINY's vocabulary (tests/models/conftest.py)


def fresh_logits(model, ids):
    with mp.no_grad():
        return model(np.asarray(ids)[None]).logits.numpy()[0, -1]


@settings(max_examples=25, deadline=None)
@given(first=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=12),
       shared=st.integers(0, 20), extra=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=8),
       new_tokens=st.integers(1, 6))
def test_the_second_prompt_reuses_its_common_prefix_and_gives_fresh_numbers(random_model, first, shared, extra,
                                                                           new_tokens):
    """Turn 1 runs ``first`` and generates; turn 2's prompt keeps ``shared`` tokens of what the cache
    holds (prompt + reply but its last token) and goes on with other tokens."""
    model, cache = random_model(seed=4), mp.PromptCache()
    out = model.generate(np.array([first]), max_new_tokens=new_tokens, eos_token_id=-1, prompt_cache=cache)[0]
    assert cache.reused == 0 and list(cache.ids) == list(out[:-1])  # the last token was never run
    second = list(out[:shared]) + extra
    step = cache.next_logits(model, np.array([second]), np.ones((1, len(second)), bool), 1, True)
    logits = step(np.array([second]), np.ones((1, len(second)), bool), np.arange(len(second))[None])
    expected_reuse = common_prefix(out[:-1], second[:-1])
    assert cache.reused == expected_reuse and list(cache.ids) == second
    np.testing.assert_allclose(logits[0], fresh_logits(model, second), rtol=1e-5, atol=1e-5)


def test_greedy_turns_with_the_cache_equal_turns_without(bundled):
    model, tok = bundled
    cache, ids, held = mp.PromptCache(), tok.encode("Once upon a time"), 0
    for follow in [" Lily said", " The end.", " Then"]:
        with_cache = model.generate(np.array([ids]), max_new_tokens=24, prompt_cache=cache)
        without = model.generate(np.array([ids]), max_new_tokens=24)
        np.testing.assert_array_equal(with_cache, without)
        assert cache.reused == held
        held = with_cache.shape[1] - 1  # all but the last generated token went through the model
        ids = list(with_cache[0]) + tok.encode(follow)[1:]  # the next prompt: all of it, then more words


def test_the_same_prompt_again_computes_only_its_last_token(random_model):
    model, cache = random_model(seed=1), mp.PromptCache()
    prompt = np.array([[5, 9, 2, 7]])
    first = model.generate(prompt, max_new_tokens=3, prompt_cache=cache)
    again = model.generate(prompt, max_new_tokens=3, prompt_cache=cache)
    assert cache.reused == 3 and np.array_equal(first, again)


def test_another_model_or_an_interrupted_reply_starts_clean(random_model):
    one, two, cache = random_model(seed=1), random_model(seed=2), mp.PromptCache()
    prompt = np.array([[5, 9, 2, 7]])
    one.generate(prompt, max_new_tokens=3, prompt_cache=cache)
    np.testing.assert_array_equal(two.generate(prompt, max_new_tokens=3, prompt_cache=cache),
                                  two.generate(prompt, max_new_tokens=3))
    assert cache.reused == 0  # keys of the other model are never read

    def interrupt_after_two(ids, seen=[]):  # noqa: B006 - counts calls
        seen.append(ids)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        two.generate(prompt, max_new_tokens=8, prompt_cache=cache, streamer=interrupt_after_two)
    longer = np.array([[5, 9, 2, 7, 11, 3]])
    np.testing.assert_array_equal(two.generate(longer, max_new_tokens=4, prompt_cache=cache),
                                  two.generate(longer, max_new_tokens=4))


def test_what_it_cannot_serve_is_refused_by_name(random_model):
    model, cache = random_model(), mp.PromptCache()
    with pytest.raises(InputError, match="one sequence at a time"):
        model.generate(np.array([[1, 2], [3, 4]]), prompt_cache=cache)
    with pytest.raises(InputError, match="one sequence at a time"):
        model.generate(np.array([[1, 2]]), do_sample=True, num_return_sequences=2, prompt_cache=cache)
    with pytest.raises(InputError, match="use_cache=True"):
        model.generate(np.array([[1, 2]]), use_cache=False, prompt_cache=cache)
    with pytest.raises(InputError, match="without padding"):
        model.generate(np.array([[0, 1, 2]]), attention_mask=np.array([[0, 1, 1]]), prompt_cache=cache)
    with pytest.raises(InputError, match="must be a minipeft PromptCache"):
        model.generate(np.array([[1, 2]]), prompt_cache=KVCache(2))
    prompt_tuned = mp.peft.get_peft_model(model, mp.peft.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(InputError, match="virtual tokens"):
        prompt_tuned.generate(np.array([[1, 2]]), prompt_cache=cache)


def test_kv_cache_truncate_keeps_a_prefix_and_checks_its_bounds():
    cache = KVCache(1)
    cache.length = 5
    cache.truncate(2)
    assert cache.length == 2
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="truncate"):
            cache.truncate(bad)


def test_clear_after_the_weights_change(random_model):
    """Keys and values are the model's as it was; after a weight change, clear() starts afresh."""
    model, cache = random_model(seed=6), mp.PromptCache()
    prompt = np.array([[5, 9, 2, 7, 1]])
    model.generate(prompt, max_new_tokens=2, prompt_cache=cache)
    model.model.layers[0].self_attn.k_proj.weight.data *= 2  # a changed model
    cache.clear()
    np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=4, prompt_cache=cache),
                                  model.generate(prompt, max_new_tokens=4))
    assert cache.reused == 0


def test_stream_takes_the_cache_too(random_model):
    from minipeft.models.generation import stream  # noqa: PLC0415

    model, cache = random_model(seed=2), mp.PromptCache()
    prompt = np.array([[5, 9, 2, 7]])
    first = model.generate(prompt, max_new_tokens=3, prompt_cache=cache)
    longer = np.concatenate([first, [[4, 4]]], axis=1)
    streamed = np.concatenate(list(stream(model, longer, max_new_tokens=5, prompt_cache=cache)))
    assert cache.reused == first.shape[1] - 1
    np.testing.assert_array_equal(streamed, model.generate(longer, max_new_tokens=5)[0, longer.shape[1]:])
