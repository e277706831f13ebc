"""Generation: golden text of the bundled model, transformers' greedy ids, KV cache ==
full recomputation, left padding, stop ids, the sampling rules, and the cache itself."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.autograd import no_grad
from minipeft.autograd.tensor import Tensor
from minipeft.models.generation import select_next_tokens

# Made once with transformers 5.24.0 (torch 2.13.0+cpu) on the bundled folder:
#   model = transformers.AutoModelForCausalLM.from_pretrained(minipeft.bundled_model_path())
#   tok = transformers.AutoTokenizer.from_pretrained(minipeft.bundled_model_path())
#   out = model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=256)
#   text = tok.decode(out[0], skip_special_tokens=True)   # written as is, UTF-8, no newline added
# (transformers produced all 256 tokens: neither stop id 2 nor 1 came up.)
GOLDEN = Path(__file__).parent / "golden" / "stories260K_greedy_bos.txt"


def golden_text() -> str:
    return GOLDEN.read_text(encoding="utf-8")


# ----- the bundled model --------------------------------------------------------------------
def test_golden_greedy_text_from_bos(bundled):
    model, tok = bundled
    out = model.generate(np.array([[1]]), max_new_tokens=256, temperature=0.0)
    assert out.shape == (1, 257)
    assert tok.decode(out[0]) == golden_text()


def test_golden_text_is_real_text():
    text = golden_text()
    assert text.startswith("Once upon a time") and len(text) > 400


@pytest.mark.parametrize("prompt", ["", "Once upon a time, a cat", "The sun was hot. Tom"])
def test_greedy_ids_equal_transformers(bundled, oracles, prompt):
    """transformers greedy stops at the eos ids [2, 1] of generation_config.json; compare
    the ids up to its length (ours may go on where it stopped only if it stopped)."""
    torch, transformers = oracles
    model, tok = bundled
    ids = tok.encode(prompt)
    if not ids or ids[0] != tok.bos_token_id:
        ids = [tok.bos_token_id] + ids
    ref = transformers.AutoModelForCausalLM.from_pretrained(mp.bundled_model_path()).eval()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=96,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = expected[0].tolist()
    ours = model.generate(np.array([ids]), max_new_tokens=96, temperature=0.0)[0].tolist()
    assert ours[:len(expected)] == expected
    assert len(ours) == len(expected)  # both stop at the same stop id, or both run to the end


# ----- KV cache == full recomputation -------------------------------------------------------
@st.composite
def generation_cases(draw):
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 6))
    pads = draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch))
    sampling = draw(st.booleans())
    return dict(
        seed=draw(st.integers(0, 2**16)),
        kv_heads=draw(st.sampled_from([1, 2, 4])),
        batch=batch, length=length, pads=pads,
        max_new_tokens=draw(st.integers(1, 8)),
        temperature=draw(st.floats(0.3, 2.0)) if sampling else 0.0,
        top_k=draw(st.one_of(st.none(), st.integers(1, 20))) if sampling else None,
        top_p=draw(st.one_of(st.none(), st.floats(0.1, 1.0))) if sampling else None,
    )


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=generation_cases())
def test_kv_cache_generation_equals_full_recomputation(random_model, device, case):
    model = random_model(case["seed"], num_key_value_heads=case["kv_heads"]).to(device=device)
    rng = np.random.default_rng(case["seed"])
    ids = rng.integers(3, 96, (case["batch"], case["length"]))
    mask = (np.arange(case["length"])[None, :] >= np.array(case["pads"])[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=case["max_new_tokens"],
                  temperature=case["temperature"], top_k=case["top_k"], top_p=case["top_p"],
                  seed=case["seed"])
    cached = model.generate(ids, use_cache=True, **kwargs)
    full = model.generate(ids, use_cache=False, **kwargs)
    np.testing.assert_array_equal(cached, full)
    assert cached.shape[0] == case["batch"]
    assert case["length"] < cached.shape[1] <= case["length"] + case["max_new_tokens"]
    np.testing.assert_array_equal(cached[:, :case["length"]], ids)  # the prompt is kept


def test_cached_step_logits_equal_full_forward(random_model, device):
    """The logits behind each cached step equal those of a full forward pass."""
    model = random_model(5, attention_bias=True).to(device=device)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12))
    with no_grad():
        full = model(ids).logits.numpy()
        cache = mp.KVCache(model.config.num_hidden_layers)
        pieces = [model(ids[:, :5], cache=cache).logits.numpy()]
        for t in range(5, 12):
            pieces.append(model(ids[:, t:t + 1], cache=cache).logits.numpy())
    assert cache.length == 12
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-5)


def test_an_all_ones_mask_is_the_causal_mask_alone(random_model, device):
    """A mask with no padding (generation passes one every step) takes the unpadded path: the
    same logits bit for bit, cached and not, and every layer reads one shared, read-only mask."""
    model = random_model(6).to(device=device)
    ids = np.random.default_rng(1).integers(0, 96, (2, 7))
    with no_grad():
        bare, masked = model(ids).logits.numpy(), model(ids, attention_mask=np.ones((2, 7), int)).logits.numpy()
        cache = mp.KVCache(model.config.num_hidden_layers)
        model(ids[:, :6], attention_mask=np.ones((2, 6), int), cache=cache)
        step = model(ids[:, 6:], attention_mask=np.ones((2, 7), int), cache=cache).logits.numpy()
    np.testing.assert_array_equal(masked, bare)
    np.testing.assert_allclose(step[:, 0], bare[:, 6], rtol=0, atol=1e-5)
    from minipeft.autograd.fused.attention import causal_bias  # noqa: PLC0415
    shared = causal_bias(7, 7, np.dtype(np.float32), np)
    assert shared is causal_bias(7, 7, np.dtype(np.float32), np)
    with pytest.raises(ValueError):
        shared[..., 0] = 1.0  # nothing may write into the mask every layer shares


def test_same_seed_same_samples_other_seed_other_samples(bundled):
    model, _ = bundled
    kwargs = dict(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.95)
    a = model.generate(np.array([[1]]), seed=7, **kwargs)
    b = model.generate(np.array([[1]]), seed=7, **kwargs)
    c = model.generate(np.array([[1]]), seed=8, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or (a != c).any()


# ----- left padding -------------------------------------------------------------------------
def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = np.array([[pad] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_left_padded_batch_equals_each_row_alone(bundled):
    model, tok = bundled
    rows = [tok.encode(t) for t in ("Once upon a time", "Tom had a big red ball and",
                                     "Lily", "The dog ran to the park. It was so happy")]
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert out.shape == (4, ids.shape[1] + 24)
    for i, row in enumerate(rows):
        alone = model.generate(np.array([row]), max_new_tokens=24, eos_token_id=[])
        np.testing.assert_array_equal(out[i, ids.shape[1]:], alone[0, len(row):])


def test_left_padding_with_random_model_and_kv_groups(random_model):
    model = random_model(11, num_key_value_heads=1, mlp_bias=True)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    ids, mask = left_pad(rows, pad=4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    for i, row in enumerate(rows):
        alone = model.generate(np.array([row]), max_new_tokens=10, eos_token_id=[])
        np.testing.assert_array_equal(out[i, ids.shape[1]:], alone[0, len(row):])


def test_right_padding_and_bad_masks_are_rejected(random_model):
    model = random_model(0)
    with pytest.raises(mp.InputError, match="left-padded"):
        model.generate(np.array([[5, 6, 0]]), attention_mask=np.array([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(mp.InputError, match="attention_mask has shape"):
        model.generate(np.array([[5, 6, 7]]), attention_mask=np.array([[1, 1]]), max_new_tokens=2)
    with pytest.raises(mp.InputError, match="input_ids"):
        model.generate(np.array([5, 6, 7]), max_new_tokens=2)


# ----- stop ids -----------------------------------------------------------------------------
def first_index(values, stop):
    hits = [i for i, v in enumerate(values) if v in stop]
    return hits[0] if hits else None


def test_stop_ids_pad_finished_rows_and_end_early(bundled):
    """Each row equals the unstopped run up to and including its first stop id, then holds
    pad_token_id; generation ends as soon as every row has stopped."""
    model, tok = bundled
    rows = [tok.encode("Once upon a time"), tok.encode("Lily and Tom")]
    ids, mask = left_pad(rows)
    width, n = ids.shape[1], 40
    free = model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
    assert free.shape == (2, width + n)
    new = free[:, width:]
    # a stop id both rows produce, first at different steps, well before the end
    candidates = [int(t) for t in new[0] if t in new[1]
                  and first_index(new[0], {t}) != first_index(new[1], {t})
                  and max(first_index(new[0], {t}), first_index(new[1], {t})) < n - 5]
    assert candidates, "pick other prompts: no shared id to stop at"
    stop = candidates[0]
    stops = [first_index(new[i], {stop}) for i in range(2)]

    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=int(stop), pad_token_id=0)
    assert out.shape == (2, width + max(stops) + 1)  # ended early, when the last row stopped
    for i in range(2):
        got = out[i, width:]
        np.testing.assert_array_equal(got[:stops[i] + 1], new[i, :stops[i] + 1])
        assert (got[stops[i] + 1:] == 0).all()  # padded after its stop id


def test_stop_ids_come_from_generation_config_unless_given(random_model):
    """The argument wins over generation_config.json's eos_token_id, which wins over config.json's."""
    model = random_model(3)
    prompt = np.array([[5, 6, 7]])
    free = model.generate(prompt, max_new_tokens=12, eos_token_id=[])[0, 3:].tolist()
    assert len(free) == 12
    target = free[4]
    stopped_len = 3 + free.index(target) + 1
    unused = [t for t in range(96) if t not in free][:2]

    model.config = dataclasses.replace(model.config, eos_token_id=target)
    assert model.generate(prompt, max_new_tokens=12).shape[1] == stopped_len
    model.generation_config = {"eos_token_id": unused}  # overrides config.json's
    assert model.generate(prompt, max_new_tokens=12).shape[1] == 15
    model.generation_config = {"eos_token_id": [unused[0], target]}
    assert model.generate(prompt, max_new_tokens=12).shape[1] == stopped_len
    assert model.generate(prompt, max_new_tokens=12, eos_token_id=[]).shape[1] == 15
    assert model.generate(prompt, max_new_tokens=12, eos_token_id=free[0]).shape[1] == 4


def test_pad_defaults_to_smallest_stop_id(random_model):
    model = random_model(3)
    prompt = np.array([[5, 6, 7], [8, 9, 10]])
    free = model.generate(prompt, max_new_tokens=12, eos_token_id=[])[:, 3:]
    target = next(int(t) for t in free[0] if t not in free[1])
    unused = max(t for t in range(96) if t not in free)
    stop = free[0].tolist().index(target)
    out = model.generate(prompt, max_new_tokens=12, eos_token_id=[unused, target])
    assert out.shape[1] == 15  # row 1 never stops
    np.testing.assert_array_equal(out[1, 3:], free[1])
    np.testing.assert_array_equal(out[0, 3:3 + stop + 1], free[0, :stop + 1])
    assert (out[0, 3 + stop + 1:] == min(target, unused)).all()


# ----- select_next_tokens -------------------------------------------------------------------
class FixedDraws:
    """A stand-in generator whose every uniform draw is ``u`` (the edges of [0, 1))."""

    def __init__(self, u):
        self.u = u

    def random(self, shape):
        return np.full(shape, self.u)


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = np.random.default_rng(0).standard_normal((5, 50))
    np.testing.assert_array_equal(select_next_tokens(logits, temperature=0.0), logits.argmax(-1))
    for seed in range(5):
        got = select_next_tokens(logits, temperature=1.5, top_k=1, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(got, logits.argmax(-1))


def test_top_p_keeps_exactly_the_nucleus():
    """probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625: the nucleus of p is the smallest set of
    most likely tokens whose mass reaches p, sampled in proportion to its probabilities."""
    probs = np.array([0.0625, 0.25, 0.5, 0.0625, 0.125])  # tokens 2, 1, 4 are the top three
    logits = np.log(probs)[None, :]
    for top_p, nucleus in [(0.4, {2}), (0.6, {2, 1}), (0.74, {2, 1}), (0.8, {2, 1, 4}),
                           (0.99, {0, 1, 2, 3, 4})]:
        rng = np.random.default_rng(0)
        draws = select_next_tokens(np.repeat(logits, 4000, axis=0), temperature=1.0, top_p=top_p, rng=rng)
        assert set(draws.tolist()) == nucleus, top_p
        # in proportion: each kept token's share is its renormalised probability
        kept = np.array(sorted(nucleus))
        expected = probs[kept] / probs[kept].sum()
        shares = np.array([(draws == t).mean() for t in kept])
        np.testing.assert_allclose(shares, expected, atol=0.03)


@pytest.mark.parametrize("u", [0.0, float(np.nextafter(1.0, 0.0))], ids=["draw-0", "draw-max"])
def test_edge_draws_never_pick_a_cut_token(u):
    """A draw of exactly 0, or above the rounded total mass, must still land on a kept token."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        logits = rng.standard_normal((1, 9))
        logits[0, 0] = logits[0, -1] = -8.0  # the first and last ids are never in the top 3
        top3 = set(np.argsort(-logits[0])[:3].tolist())
        assert int(select_next_tokens(logits, 1.0, top_k=3, rng=FixedDraws(u))[0]) in top3
        got = int(select_next_tokens(logits, 1.0, top_p=0.3, rng=FixedDraws(u))[0])
        assert got != 0 and got != 8


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 40), top_k=st.integers(1, 40),
       temperature=st.floats(0.05, 5.0), batch=st.integers(1, 4))
def test_sampled_tokens_stay_in_top_k_and_repeat_with_seed(seed, vocab, top_k, temperature, batch):
    logits = np.random.default_rng(seed).standard_normal((batch, vocab)) * 3
    kth = np.sort(logits, axis=-1)[:, -min(top_k, vocab)][:, None]
    a = select_next_tokens(logits, temperature, top_k=top_k, rng=np.random.default_rng(seed))
    b = select_next_tokens(logits, temperature, top_k=top_k, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (batch,)
    assert (np.take_along_axis(logits, a[:, None], axis=-1) >= kth).all()


def test_sampling_follows_the_softmax_with_temperature():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]]))
    draws = select_next_tokens(np.repeat(logits, 20000, axis=0), temperature=0.5,
                               rng=np.random.default_rng(1))
    p = np.array([0.1, 0.2, 0.3, 0.4]) ** 2
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 20000, p / p.sum(), atol=0.015)


# ----- the cache ----------------------------------------------------------------------------
def test_kv_cache_grows_beyond_reserved_capacity_keeping_values():
    rng = np.random.default_rng(0)
    cache = mp.KVCache(num_layers=2)
    cache.reserve(batch=2, kv_heads=3, capacity=4, head_dim=5, dtype=np.float32, xp=np)
    keys, values = [], []
    for step in (3, 1, 2, 7, 1):  # passes the reserved 4, then doubles more than once
        k = rng.standard_normal((2, 3, step, 5)).astype(np.float32)
        v = rng.standard_normal((2, 3, step, 5)).astype(np.float32)
        keys.append(k)
        values.append(v)
        for layer in range(2):
            got_k, got_v = cache.update(layer, Tensor(k + layer), Tensor(v - layer))
            np.testing.assert_array_equal(got_k.data, np.concatenate(keys, axis=2) + layer)
            np.testing.assert_array_equal(got_v.data, np.concatenate(values, axis=2) - layer)
        cache.advance(step)
    assert cache.length == 14
    assert cache.keys[0].shape[2] >= 14


def test_kv_cache_without_reserve_and_with_gradients():
    cache = mp.KVCache(num_layers=1)
    k1 = Tensor(np.ones((1, 1, 2, 2), np.float32))
    cache.update(0, k1, k1)
    cache.advance(2)
    k2 = Tensor(np.full((1, 1, 1, 2), 2.0, np.float32), requires_grad=True)
    got_k, _ = cache.update(0, k2, k2)
    assert got_k.shape == (1, 1, 3, 2) and got_k.requires_grad
    got_k.sum().backward()
    np.testing.assert_array_equal(k2.grad, np.ones((1, 1, 1, 2)))
