"""Child-tuning F (a fresh Bernoulli(p) gradient mask each step, scaled by 1/p) and D (a fixed
Fisher mask of density p): statistics of F's mask, D's mask against the authors' percentile rule,
entries outside D's mask never move."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft.errors import ConfigError
from minipeft.nn import Linear
from minipeft.peft import ChildTuningConfig, get_peft_model
from minipeft.peft.selective import fisher
from minipeft.peft.selective.weight_delta import DeltaLinear, sparse_layers
from minipeft.train import Trainer, TrainingArguments
from minipeft.train.data import Dataset
from tests.peft.helpers import TINIER, logits, tiny_model, token_ids
from tests.peft.selective.test_fishmask import batches_of, examples, interrupted_and_resumed, weight_of

TARGETS = ["k_proj", "o_proj", "up_proj"]


def targeted_size(base, config) -> int:
    return sum(m.weight.size for name, m in base.named_modules() if isinstance(m, Linear)
               and any(name.endswith("." + t) for t in config.target_modules))


def child_tuning_count(base, config: ChildTuningConfig) -> int:
    """F: out·in per targeted Linear; D: the mask's k = n − ⌈(1 − p)(n − 1)⌉."""
    n = targeted_size(base, config)
    return n if config.mode == "F" else fisher.percentile_count(n, config.reserve_p)


# ----- F ------------------------------------------------------------------------------------
def test_f_mask_keeps_p_of_the_entries_and_is_unbiased():
    p, steps = 0.3, 400
    config = ChildTuningConfig(mode="F", reserve_p=p, target_modules=["q_proj"])
    peft_model = get_peft_model(tiny_model(0), config, seed=7)
    deltas = [layer.delta_weight["default"] for _, layer in peft_model.adapter_layers("default", DeltaLinear)]
    grads = [np.random.default_rng(1).normal(size=d.shape).astype(d.dtype) for d in deltas]
    kept = [np.zeros(d.shape) for d in deltas]
    total = [np.zeros(d.shape) for d in deltas]
    for step in range(steps):
        for d, g in zip(deltas, grads):
            d.grad = g.copy()
        peft_model.mask_gradients(step)
        for d, g, c, t in zip(deltas, grads, kept, total):
            on = d.grad != 0
            np.testing.assert_allclose(d.grad[on], g[on] / p, rtol=1e-6)  # kept entries scaled by 1/p
            c += on
            t += d.grad
    counts = np.concatenate([c.reshape(-1) for c in kept])
    n = counts.size * steps
    assert abs(counts.sum() / n - p) < 5 * np.sqrt(p * (1 - p) / n)  # the kept fraction: binomial bound
    per_entry = 6 * np.sqrt(p * (1 - p) / steps)  # each entry kept ~ Binomial(steps, p)
    assert np.all(np.abs(counts / steps - p) < per_entry)
    # E[g ⊙ M / p] = g: the mean masked gradient over the steps, relative to g, is 1 within the same bound
    ratio = np.concatenate([(t / steps / g).reshape(-1) for t, g in zip(total, grads)])
    assert abs(ratio.mean() - 1) < 5 * np.sqrt((1 - p) / (p * ratio.size * steps))
    assert np.all(np.abs(ratio - 1) < per_entry / p + 1e-4)


def test_f_masks_come_from_the_model_rng():
    def masks(seed):
        config = ChildTuningConfig(mode="F", target_modules=["v_proj"])
        peft_model = get_peft_model(tiny_model(0), config, seed=seed)
        delta = peft_model.adapter_layers("default", DeltaLinear)[0][1].delta_weight["default"]
        delta.grad = np.ones(delta.shape, dtype=delta.dtype)
        peft_model.mask_gradients(0)
        return delta.grad != 0

    assert np.array_equal(masks(3), masks(3)) and not np.array_equal(masks(3), masks(4))


def test_f_resumed_run_draws_the_same_masks(tmp_path):
    config = ChildTuningConfig(mode="F", target_modules=TARGETS)
    data = Dataset(examples(length=9, vocab=96), pad_id=0, seq_len=16)
    straight, resumed = interrupted_and_resumed(lambda _: get_peft_model(tiny_model(0), config, seed=2),
                                                data, tmp_path)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)


def test_f_count_and_identity():
    config = ChildTuningConfig(mode="F", target_modules=TARGETS)
    peft_model = get_peft_model(tiny_model(0), config)
    assert peft_model.get_nb_trainable_parameters()[0] == child_tuning_count(tiny_model(0), config)
    np.testing.assert_array_equal(logits(peft_model, token_ids()), logits(tiny_model(0), token_ids()))
    peft_model.calibrate([])  # F needs no calibration: nothing read, nothing changes


# ----- D ------------------------------------------------------------------------------------
def hand_fisher_d(batches, paths, clip):
    """(1/B) Σ_b (∂L_b/∂W clipped to norm ``clip`` per tensor)², the plain model's autograd."""
    model = tiny_model(0, dtype=np.float64, size=TINIER)
    for p in model.parameters():
        p.requires_grad = False
    weights = [weight_of(model, p) for p in paths]
    total = [np.zeros(w.shape) for w in weights]
    for b in batches:
        for w in weights:
            w.requires_grad, w.grad = True, None
        model(b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss.backward()
        for t, w in zip(total, weights):
            g = w.grad * min(1.0, clip / (np.linalg.norm(w.grad) + 1e-6))
            t += g ** 2 / len(batches)
    return total


@pytest.mark.parametrize("p, clip", [(0.3, 1.0), (0.1, 0.01)])
def test_d_mask_is_the_authors_percentile_rule_on_clipped_mean_fisher(p, clip):
    config = ChildTuningConfig(mode="D", reserve_p=p, max_grad_norm=clip, target_modules=TARGETS)
    peft_model = get_peft_model(tiny_model(0, dtype=np.float64, size=TINIER), config)
    batches = batches_of(examples(), 2)
    peft_model.calibrate(batches)
    layers = sparse_layers(peft_model, "default")
    scores = np.concatenate([h.reshape(-1) for h in hand_fisher_d(batches, [q for q, _ in layers], clip)])
    authors = scores >= np.percentile(scores, (1 - p) * 100)  # ChildTuningD.py
    offsets = np.cumsum([0] + [layer.size for _, layer in layers])
    ours = np.zeros(scores.size, dtype=bool)
    for (_, layer), off in zip(layers, offsets):
        ours[layer.delta_indices["default"] + off] = True
    np.testing.assert_array_equal(ours, authors)
    assert abs(ours.mean() - p) <= 1 / scores.size  # density p
    assert ours.sum() == child_tuning_count(tiny_model(0, size=TINIER), config)


@pytest.mark.parametrize("n", [2, 7, 100, 1001, 4096])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.999, 1.0])
def test_percentile_count_is_what_the_authors_rule_keeps_on_distinct_scores(n, p):
    scores = np.random.default_rng(n).permutation(n) + np.random.default_rng(1).random(n) * 0.5
    assert fisher.percentile_count(n, p) == int((scores >= np.percentile(scores, (1 - p) * 100)).sum())


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_d_entries_outside_the_mask_never_change(tmp_path, weight_decay):
    config = ChildTuningConfig(mode="D", reserve_p=0.2, target_modules=TARGETS)
    peft_model = get_peft_model(tiny_model(0), config)
    data = Dataset(examples(length=9, vocab=96), pad_id=0, seq_len=16)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=3, batch_size=2, lr=1e-2, seq_len=16,
                             warmup_steps=0, weight_decay=weight_decay, progress=False)
    Trainer(peft_model, args, data).train()  # calibrates, then trains
    base = tiny_model(0)
    for path, layer in sparse_layers(peft_model, "default"):
        mask = layer.delta_indices["default"]
        w0 = base.get_submodule(path).weight.data.reshape(-1)
        merged = layer.merge_into("default", layer.base_layer.weight.data).reshape(-1)
        outside = np.setdiff1d(np.arange(w0.size), mask)
        np.testing.assert_array_equal(merged[outside], w0[outside])
        assert np.count_nonzero(merged[mask] != w0[mask]) > 0.9 * mask.size  # the mask itself trains
    density = sum(len(l.delta_indices["default"]) for _, l in sparse_layers(peft_model, "default")) / \
        targeted_size(base, config)
    assert abs(density - 0.2) <= 1 / targeted_size(base, config)


def test_d_uncalibrated_refuses_a_training_step():
    peft_model = get_peft_model(tiny_model(0), ChildTuningConfig(mode="D", target_modules=TARGETS))
    np.testing.assert_array_equal(logits(peft_model, token_ids()), logits(tiny_model(0), token_ids()))
    with pytest.raises(ConfigError, match="calibrate"):
        peft_model.mask_gradients(0)


@pytest.mark.parametrize("kwargs, field", [(dict(mode="X"), "mode"), (dict(reserve_p=0), "reserve_p"),
                                           (dict(reserve_p=1.2), "reserve_p"), (dict(max_grad_norm=0), "max_grad_norm"),
                                           (dict(mode="F", mask_path="m.safetensors"), "mask_path"),
                                           (dict(modules_to_save=["lm_head"]), "modules_to_save")])
def test_config_fields_are_checked(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ChildTuningConfig(**kwargs)
