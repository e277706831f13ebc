"""add_weighted_adapter (combine.py): cat / exact, PEFT's linear (with its cross terms), svd."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.peft import LoraConfig, PeftModel, get_peft_model
from tests.peft.helpers import logits, randomize, tiny_model, token_ids

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def three_adapters(seed=0, ranks=(2, 3, 4), rslora=False):
    """Adapters a, b, c (random, float64) with different ranks and alphas on the same layers."""
    peft_model = get_peft_model(tiny_model(seed, dtype=np.float64),
                                LoraConfig(r=ranks[0], lora_alpha=3, use_rslora=rslora, target_modules=TARGETS),
                                adapter_name="a", seed=seed)
    for name, r, alpha in zip("bc", ranks[1:], (5, 2)):
        peft_model.add_adapter(name, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS))
    randomize(peft_model, seed, scale=0.5)
    return peft_model.eval()


def layers(peft_model):
    return [m for m in peft_model.adapter_modules()]


def weighted_delta(layer, names, weights):
    return sum(w * layer.delta_ba(n) for n, w in zip(names, weights))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), weights=st.lists(st.floats(-2, 2), min_size=3, max_size=3),
       kind=st.sampled_from(["cat", "exact"]))
def test_cat_is_the_exact_weighted_sum_of_the_deltas(seed, weights, kind):
    peft_model = three_adapters(seed)
    peft_model.add_weighted_adapter(["a", "b", "c"], weights, "mix", combination_type=kind)
    for layer in layers(peft_model):
        assert layer.r["mix"] == 2 + 3 + 4 and layer.scaling["mix"] == 1.0
        np.testing.assert_allclose(layer.delta_ba("mix"), weighted_delta(layer, "abc", weights), atol=1e-12)
    assert peft_model.active_adapter == "a" and "mix" not in [g.name for g in peft_model.parameter_groups()]
    peft_model.set_adapter("mix")
    mixed = logits(peft_model, token_ids())
    peft_model.set_adapter(["a", "b", "c"])  # the same sum, as three adapters with scaled B's
    for layer in layers(peft_model):
        for name, w in zip("abc", weights):
            layer.factors(name)[1].data *= w
    np.testing.assert_allclose(mixed, logits(peft_model, token_ids()), rtol=1e-10, atol=1e-10)


def test_linear_is_peft_formula_with_its_cross_terms():
    peft_model = three_adapters(ranks=(3, 3, 3))
    weights = [0.7, -1.2, 0.4]
    peft_model.add_weighted_adapter(["a", "b", "c"], weights, "lin", combination_type="linear")
    for layer in layers(peft_model):
        c = [w * layer.scaling[n] for n, w in zip("abc", weights)]
        A = sum(np.sign(ci) * np.sqrt(abs(ci)) * layer.factors(n)[0].data for n, ci in zip("abc", c))
        B = sum(np.sqrt(abs(ci)) * layer.factors(n)[1].data for n, ci in zip("abc", c))
        np.testing.assert_allclose(layer.delta_ba("lin"), B @ A, atol=1e-12)
        cross = B @ A - weighted_delta(layer, "abc", weights)  # the i ≠ j terms: not the weighted sum
        assert np.abs(cross).max() > 1e-3


def test_linear_needs_equal_ranks_and_one_adapter_is_always_linear():
    peft_model = three_adapters()
    with pytest.raises(ValueError, match="equal rank"):
        peft_model.add_weighted_adapter(["a", "b"], [1, 1], "lin", combination_type="linear")
    peft_model.add_weighted_adapter(["b"], [-0.5], "half", combination_type="svd")
    for layer in layers(peft_model):
        assert layer.r["half"] == 3
        np.testing.assert_allclose(layer.delta_ba("half"), -0.5 * layer.delta_ba("b"), atol=1e-12)


def test_svd_reconstructs_the_sum_when_the_rank_suffices_and_truncates_optimally_otherwise():
    peft_model = three_adapters()
    weights = [1.0, -0.5, 2.0]
    peft_model.add_weighted_adapter(["a", "b", "c"], weights, "full", combination_type="svd", svd_rank=9)
    peft_model.add_weighted_adapter(["a", "b", "c"], weights, "low", combination_type="svd")  # rank max r_i = 4
    for layer in layers(peft_model):
        exact = weighted_delta(layer, "abc", weights)
        np.testing.assert_allclose(layer.delta_ba("full"), exact, atol=1e-10)
        U, S, Vh = np.linalg.svd(exact)
        np.testing.assert_allclose(layer.delta_ba("low"), (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-10)


def test_svd_clamp_clips_the_factors_to_the_quantile():
    peft_model = three_adapters()
    peft_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "free")
    peft_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "clamped", svd_clamp=0.9)
    for layer in layers(peft_model):
        A, B = (t.data for t in layer.factors("free"))
        high = np.quantile(np.concatenate([B.ravel(), A.ravel()]), 0.9)
        np.testing.assert_allclose(layer.factors("clamped")[0].data, np.clip(A, -high, high), atol=1e-12)
        np.testing.assert_allclose(layer.factors("clamped")[1].data, np.clip(B, -high, high), atol=1e-12)


def test_rslora_sources_give_a_plain_scaling_of_one():
    peft_model = three_adapters(rslora=True)
    peft_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "sum", combination_type="cat")
    config = peft_model.peft_config["sum"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (5, 5, False)
    for layer in layers(peft_model):
        np.testing.assert_allclose(layer.delta_ba("sum"), weighted_delta(layer, "ab", [1, 1]), atol=1e-12)


def test_refusals():
    peft_model = three_adapters()
    with pytest.raises(ValueError, match="do not exist"):
        peft_model.add_weighted_adapter(["a", "zzz"], [1, 1], "x")
    with pytest.raises(ValueError, match="already exists"):
        peft_model.add_weighted_adapter(["a", "b"], [1, 1], "c")
    with pytest.raises(ValueError, match="combination_type"):
        peft_model.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties")
    dora = get_peft_model(tiny_model(), LoraConfig(use_dora=True))
    dora.add_adapter("other", LoraConfig(use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        dora.add_weighted_adapter(["default", "other"], [1, 1], "x")


def test_a_combined_adapter_saves_and_loads(tmp_path):
    peft_model = three_adapters()
    peft_model.add_weighted_adapter(["a", "c"], [0.5, 0.5], "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    expected = logits(peft_model, token_ids())
    peft_model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(tiny_model(0, dtype=np.float64), tmp_path / "mix")
    np.testing.assert_allclose(logits(loaded, token_ids()), expected, rtol=1e-12, atol=1e-12)
