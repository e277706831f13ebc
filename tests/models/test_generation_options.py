"""transformers' generate options: repetition_penalty and num_return_sequences against
transformers on the same weights, do_sample and its warnings, every invalid value refused by
name, streaming, and the max_position_embeddings window."""
from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.errors import InputError
from minipeft.models.generation import penalize_repetitions, stream


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_checkpoint):
    """A tiny random llama written by transformers, and (ours, theirs) loaded from it."""
    folder = hf_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", seed=4)
    return folder


def _prompts(seed: int, batch: int, length: int, vocab: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length))


# ----- oracle: transformers on the same weights -------------------------------------------
@pytest.mark.parametrize("penalty", [0.7, 1.1, 1.3, 2.0])
def test_repetition_penalty_greedy_ids_equal_transformers(checkpoint, hf_load_float32, oracles, penalty):
    torch, _ = oracles
    ours, theirs = mp.LlamaForCausalLM.from_pretrained(checkpoint), hf_load_float32(checkpoint)
    for seed in range(3):
        prompt = _prompts(seed, batch=1, length=6)
        with torch.no_grad():
            expected = theirs.generate(torch.tensor(prompt), attention_mask=torch.ones_like(torch.tensor(prompt)),
                                       do_sample=False, max_new_tokens=40, repetition_penalty=penalty)
        got = ours.generate(prompt, max_new_tokens=40, repetition_penalty=penalty)
        assert got.tolist() == expected.tolist(), (penalty, seed)
    free = ours.generate(prompt, max_new_tokens=40)
    assert not np.array_equal(free, got)  # the penalty changed the text, so the comparison means something


def test_repetition_penalty_on_the_bundled_model_equals_transformers(bundled, oracles):
    torch, transformers = oracles
    model, tok = bundled
    ref = transformers.AutoModelForCausalLM.from_pretrained(mp.bundled_model_path()).eval()
    ids = [tok.bos_token_id] + tok.encode("Once upon a time, a cat", add_special_tokens=False)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=80, repetition_penalty=1.3)
    got = model.generate(np.array([ids]), max_new_tokens=80, repetition_penalty=1.3)
    assert got.tolist() == expected.tolist()
    # the penalty's point, measured: fewer repeated tokens than plain greedy
    plain = model.generate(np.array([ids]), max_new_tokens=80)[0, len(ids):]
    penalized = got[0, len(ids):]
    assert len(set(penalized.tolist())) / len(penalized) > len(set(plain.tolist())) / len(plain)


def test_num_return_sequences_shapes_and_row_order_equal_transformers(checkpoint, hf_load_float32, oracles):
    torch, _ = oracles
    ours, theirs = mp.LlamaForCausalLM.from_pretrained(checkpoint), hf_load_float32(checkpoint)
    prompt = _prompts(7, batch=2, length=5)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = theirs.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 5, dtype=torch.long),
                                   do_sample=True, num_return_sequences=3, max_new_tokens=9, min_new_tokens=9)
    got = ours.generate(prompt, do_sample=True, num_return_sequences=3, max_new_tokens=9, seed=0, eos_token_id=[])
    assert got.shape == tuple(expected.shape) == (6, 14)
    np.testing.assert_array_equal(got[:, :5], expected[:, :5].numpy())  # prompt 0 three times, then prompt 1
    assert len({tuple(row) for row in got[:3, 5:].tolist()}) > 1  # the copies are sampled independently


def test_num_return_sequences_with_top_k_1_gives_identical_greedy_rows(checkpoint):
    ours = mp.LlamaForCausalLM.from_pretrained(checkpoint)
    prompt = _prompts(8, batch=2, length=4)
    greedy = ours.generate(prompt, max_new_tokens=12, eos_token_id=[])
    copies = ours.generate(prompt, do_sample=True, top_k=1, num_return_sequences=4, max_new_tokens=12,
                           eos_token_id=[], seed=1)
    np.testing.assert_array_equal(copies, np.repeat(greedy, 4, axis=0))


def test_num_return_sequences_with_greedy_is_refused_as_transformers_refuses_it(checkpoint, hf_load_float32,
                                                                                 oracles):
    torch, _ = oracles
    with pytest.raises(ValueError, match="num_return_sequences"):
        hf_load_float32(checkpoint).generate(torch.tensor([[5, 6]]), do_sample=False, num_return_sequences=2,
                                            max_new_tokens=2)
    with pytest.raises(InputError, match="num_return_sequences"):
        mp.LlamaForCausalLM.from_pretrained(checkpoint).generate(np.array([[5, 6]]), num_return_sequences=2,
                                                                 max_new_tokens=2)


def test_transformers_text_streamer_prints_our_stream(bundled, oracles):
    """transformers' own TextStreamer, fed by our generate, prints exactly the decoded continuation."""
    _, transformers = oracles
    model, tok = bundled
    hf_tok = transformers.AutoTokenizer.from_pretrained(mp.bundled_model_path())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out = model.generate(np.array([[1]]), max_new_tokens=40,
                             streamer=transformers.TextStreamer(hf_tok, skip_prompt=True))
    assert printed.getvalue() == tok.decode(out[0, 1:]) + "\n"


# ----- the greedy / sampling rule and its warnings ------------------------------------------
def test_do_sample_false_warns_about_the_sampling_arguments_it_ignores(random_model):
    model = random_model(seed=1)
    greedy = model.generate(np.array([[3, 4]]), max_new_tokens=8, eos_token_id=[])
    with pytest.warns(UserWarning, match=r"ignores temperature=0\.7, top_k=20, top_p=0\.9"):
        out = model.generate(np.array([[3, 4]]), max_new_tokens=8, eos_token_id=[], do_sample=False,
                             temperature=0.7, top_k=20, top_p=0.9)
    np.testing.assert_array_equal(out, greedy)
    with pytest.warns(UserWarning, match="top_p=0.5"):  # no do_sample, no temperature: greedy
        model.generate(np.array([[3, 4]]), max_new_tokens=2, top_p=0.5)


def test_sampling_and_plain_greedy_do_not_warn(random_model):
    model = random_model(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(np.array([[3, 4]]), max_new_tokens=4, temperature=0.0)
        model.generate(np.array([[3, 4]]), max_new_tokens=4, do_sample=False, top_p=1.0, top_k=0)
        model.generate(np.array([[3, 4]]), max_new_tokens=4, do_sample=True, temperature=0.7, top_k=5, seed=0)
        model.generate(np.array([[3, 4]]), max_new_tokens=4, temperature=0.7, top_p=0.9, seed=0)


def test_temperature_alone_samples_as_before_and_do_sample_uses_transformers_defaults(random_model):
    model = random_model(seed=2)
    prompt, common = np.array([[3, 4]]), dict(max_new_tokens=30, eos_token_id=[], seed=5)
    legacy = model.generate(prompt, temperature=0.9, **common)  # no top-k: minipeft's older rule
    assert np.array_equal(legacy, model.generate(prompt, do_sample=True, temperature=0.9, top_k=0, **common))
    assert not np.array_equal(legacy, model.generate(prompt, **common))  # it did sample
    # do_sample=True alone: transformers' GenerationConfig defaults, temperature 1.0 and top_k 50
    assert np.array_equal(model.generate(prompt, do_sample=True, **common),
                          model.generate(prompt, do_sample=True, temperature=1.0, top_k=50, **common))


BAD_VALUES = [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(top_p=math.nan), "top_p"), (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature="0.8"), "temperature"),
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.2), "repetition_penalty"),
    (dict(num_return_sequences=0), "num_return_sequences"), (dict(do_sample="yes"), "do_sample"),
    (dict(do_sample=True, num_return_sequences=True), "num_return_sequences"),
    (dict(past_max_positions="crash"), "past_max_positions"),
]


@pytest.mark.parametrize("kwargs, name", BAD_VALUES, ids=[f"{n}={list(k.values())[-1]!r}" for k, n in BAD_VALUES])
def test_invalid_values_raise_naming_the_argument(random_model, kwargs, name):
    model = random_model()
    with pytest.raises(InputError, match=name) as caught:
        model.generate(np.array([[3, 4]]), **{"max_new_tokens": 3, **kwargs})
    assert isinstance(caught.value, ValueError)
    with pytest.raises(InputError, match=name):  # the generator form checks before its first step
        stream(model, np.array([[3, 4]]), **{"max_new_tokens": 3, **kwargs})


def test_top_p_zero_would_have_given_unk_tokens_and_now_is_refused(random_model):
    with pytest.raises(InputError, match=r"top_p must be in \(0, 1\]"):
        random_model().generate(np.array([[3, 4]]), temperature=0.8, top_p=0.0, max_new_tokens=3)


# ----- repetition penalty: the processor itself, padding, the cache ----------------------------
def test_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens_only():
    logits = np.array([[2.0, -2.0, 3.0, -1.0]], dtype=np.float32)
    seen = np.array([[True, True, False, False]])
    np.testing.assert_array_equal(penalize_repetitions(logits, seen, 2.0), [[1.0, -4.0, 3.0, -1.0]])
    np.testing.assert_array_equal(penalize_repetitions(logits, seen, 0.5), [[4.0, -1.0, 3.0, -1.0]])
    assert penalize_repetitions(logits, seen, 1.0) is logits


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(penalty=st.floats(0.5, 3.0), pad=st.integers(1, 4), sampling=st.booleans(), seed=st.integers(0, 99))
def test_penalized_padded_rows_decode_alone_and_the_cache_changes_nothing(random_model, penalty, pad, sampling,
                                                                          seed):
    model = random_model(seed=3)
    rows = _prompts(seed, batch=2, length=6)
    mask = np.ones_like(rows)
    mask[0, :pad] = 0  # row 0 is left-padded with whatever ids sit there: they must not count
    kwargs = dict(max_new_tokens=10, eos_token_id=[], repetition_penalty=penalty, seed=seed,
                  **(dict(do_sample=True, top_k=5) if sampling else {}))
    cached = model.generate(rows, attention_mask=mask, **kwargs)
    np.testing.assert_array_equal(cached, model.generate(rows, attention_mask=mask, use_cache=False, **kwargs))
    if not sampling:  # rows draw from one generator when sampling, so only greedy rows are comparable alone
        alone = model.generate(rows[:1, pad:], **kwargs)
        np.testing.assert_array_equal(cached[0, 6:], alone[0, 6 - pad:])


# ----- streaming -------------------------------------------------------------------------------
def test_streamer_callback_and_stream_generator_see_every_new_token(random_model):
    model = random_model(seed=5)
    prompt = _prompts(2, batch=2, length=3)
    kwargs = dict(max_new_tokens=12, eos_token_id=[], do_sample=True, seed=4, num_return_sequences=2)
    seen = []
    out = model.generate(prompt, streamer=lambda ids: seen.append(ids.copy()), **kwargs)
    assert out.shape == (4, 15)
    np.testing.assert_array_equal(np.stack(seen, axis=1), out[:, 3:])
    np.testing.assert_array_equal(np.stack(list(stream(model, prompt, **kwargs)), axis=1), out[:, 3:])


def test_put_end_streamer_gets_the_prompt_then_each_step_then_end(random_model):
    calls = []

    class Recorder:
        def put(self, value):
            calls.append(("put", np.asarray(value).tolist()))

        def end(self):
            calls.append(("end",))

    out = random_model(seed=5).generate(np.array([[7, 8]]), max_new_tokens=3, eos_token_id=[], streamer=Recorder())
    assert calls == [("put", [[7, 8]]), *[("put", [t]) for t in out[0, 2:].tolist()], ("end",)]


# ----- the position window ----------------------------------------------------------------------
def test_past_max_positions_warns_by_default_and_stops_when_asked(random_model):
    model = random_model(seed=6, max_position_embeddings=16)
    prompt = _prompts(3, batch=1, length=10)
    with pytest.warns(UserWarning, match=r"max_position_embeddings \(16\)"):
        long = model.generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert long.shape == (1, 22) and np.isfinite(long).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = model.generate(prompt, max_new_tokens=12, eos_token_id=[], past_max_positions="stop")
        assert model.generate(prompt, max_new_tokens=6, eos_token_id=[]).shape == (1, 16)  # fits: no warning
    assert short.shape == (1, 16)  # every token has a position the model knows
    np.testing.assert_array_equal(short, long[:, :16])
    with pytest.warns(UserWarning, match="max_position_embeddings"):  # no cache: the model reads ≤ 16 at once
        full = model.generate(prompt, max_new_tokens=12, eos_token_id=[], use_cache=False)
    np.testing.assert_array_equal(full, short)
    too_long = _prompts(3, batch=1, length=20)
    np.testing.assert_array_equal(model.generate(too_long, max_new_tokens=5, past_max_positions="stop"), too_long)
    with pytest.raises(InputError, match="max_position_embeddings"), pytest.warns(UserWarning):
        model.generate(too_long, max_new_tokens=5)  # the model refuses the prompt itself


class IdsAsText:
    """A tokenizer whose text is the ids themselves, "<5><17>...": stop strings on ids."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{int(i)}>" for i in ids)


def test_proxy_tuning_decodes_with_the_same_options(random_model):
    """Proxy-tuning's decoder takes every option too: with expert = anti-expert the shift is zero,
    so it must give the base model's ids for any option."""
    from minipeft.peft.additive.proxy_tuning import ProxyTuning  # noqa: PLC0415

    base, other = random_model(seed=7), random_model(seed=8)
    proxy = ProxyTuning(base, other, other)
    prompt = _prompts(4, batch=1, length=4)
    third = base.generate(prompt, max_new_tokens=10, eos_token_id=[])[0, 6]  # a stop string that comes up
    for kwargs in (dict(repetition_penalty=1.5), dict(do_sample=True, num_return_sequences=2, seed=3, top_p=0.9),
                   dict(stop_strings=[f"<{third}>"], tokenizer=IdsAsText())):
        streamed = []
        got = proxy.generate(prompt, max_new_tokens=10, eos_token_id=[], streamer=streamed.append, **kwargs)
        np.testing.assert_array_equal(got, base.generate(prompt, max_new_tokens=10, eos_token_id=[], **kwargs))
        np.testing.assert_array_equal(np.stack(streamed, axis=1), got[:, 4:])
        assert got.shape[1] <= 7 if "stop_strings" in kwargs else got.shape[1] == 14
