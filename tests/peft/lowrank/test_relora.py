"""ReLoRA (peft/relora.py): merge-and-reinit keeps the function, the jagged cosine follows its
closed form, pruning keeps exactly the top (1 − ρ) entries, the accumulated update's rank grows
past r, and saving, loading and resuming reproduce the merged weights bit for bit."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.errors import CheckpointError, ConfigError
from minipeft.io import read_safetensors
from minipeft.nn import ParameterGroup
from minipeft.peft import PeftModel, ReLoraConfig, get_peft_model
from minipeft.peft.lowrank.relora import (accumulated_delta, accumulated_delta_rank, adapter_layers, is_restart,
                                  magnitude_mask, prune_optimizer_state)
from minipeft.train import AdamW, Schedule, Trainer, TrainingArguments, build_dataset, jagged_cosine
from minipeft.train.data import Record
from tests.peft.helpers import logits, randomize, tiny_model, token_ids
from tests.test_cli_train import TRAIN, run, small_data
from tests.train.train_helpers import CharTokenizer

TARGETS = ["q_proj", "o_proj", "down_proj", "embed_tokens"]


def relora(r=3, seed=0, **kw):
    config = ReLoraConfig(**{"r": r, "lora_alpha": 2.0 * r, "lora_dropout": 0.0, "reset_every": 2,
                             "target_modules": TARGETS, **kw})
    return get_peft_model(tiny_model(seed), config, seed=seed)


def restart(model, k=1):
    """k cycles of: random A, B (as training would leave them), then the restart hook."""
    for j in range(k):
        randomize(model, seed=100 + j)
        model.on_step_end(model.peft_config["default"].reset_every)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 3))
def test_merge_and_reinit_keeps_the_outputs_and_zeroes_B(seed, k):
    model, ids = relora(seed=seed), token_ids(seed)
    restart(model, k - 1)
    randomize(model, seed)
    before = logits(model.eval(), ids)
    model.on_step_end(2)
    np.testing.assert_allclose(logits(model, ids), before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    for _, layer in adapter_layers(model.get_base_model(), "default"):
        A, B = layer.factors("default")
        if layer.dora_axis == 1:  # Linear: A kaiming-uniform U(±1/√in), B = 0
            assert not B.data.any() and A.data.any() and np.abs(A.data).max() <= 1 / math.sqrt(A.shape[1])
        else:  # Embedding, as LoRA's: A = 0, B ~ N(0, 1)
            assert not A.data.any() and B.data.any()
        assert len(layer.relora_merged["default"]) == k


def test_restarts_happen_after_update_n_times_N_plus_one():
    assert [s for s in range(12) if is_restart(s, 4)] == [4, 8]  # 0-based: updates 5 and 9, the code's % N == 1
    model = relora(reset_every=3)
    snapshot = {n: p.data.copy() for n, p in model.named_parameters()}
    randomize(model)
    for step in (0, 1, 2, 4, 5):
        model.on_step_end(step)
    assert all(np.array_equal(p.data, snapshot[n]) for n, p in model.named_parameters() if "base_layer" in n)
    model.on_step_end(3)
    assert not all(np.array_equal(p.data, snapshot[n]) for n, p in model.named_parameters() if "base_layer" in n)


def reference_jagged(t, W, T, N, R, rho):
    """REFERENCE 2.6's closed form, as the authors' code computes it (adjust_step = 0)."""
    def c(u):
        return rho + (1 - rho) * 0.5 * (1 + math.cos(math.pi * (u - W) / max(1, T - W)))
    if t < W:
        return t / max(1, W)
    if t % N < R and t >= N:
        return (t % N) / max(1, R) * c((t // N) * N + R)
    return c(t)


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 40), data=st.data())
def test_jagged_cosine_follows_its_closed_form(N, data):
    W, R = data.draw(st.integers(0, N)), data.draw(st.integers(0, N))
    T, rho = data.draw(st.integers(max(W, 1), 200)), data.draw(st.floats(0, 1))
    for t in range(T + 1):
        m = jagged_cosine(t, W, T, N, R, rho)
        assert m == pytest.approx(reference_jagged(t, W, T, N, R, rho), abs=1e-12)
        assert -1e-12 <= m <= 1 + 1e-12
        if t >= max(N, W) and t % N == 0 and R > 0:
            assert m == 0.0  # the update before each merge runs at lr 0


def test_trainer_lr_follows_the_jagged_schedule(tmp_path):
    data = build_dataset([Record("", "abcabcab", f"m{i}") for i in range(4)], CharTokenizer(), 16)
    args = TrainingArguments(str(tmp_path), max_steps=12, batch_size=2, lr=0.01, warmup_steps=2, seq_len=16,
                             schedule="jagged_cosine", restart_every=4, restart_warmup_steps=2, min_lr_ratio=0.2,
                             log_every=1, progress=False)
    Trainer(relora(reset_every=4), args, data).train()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line]
    assert lrs == pytest.approx([0.01 * reference_jagged(s, 2, 12, 4, 2, 0.2) for s in range(12)], abs=1e-15)
    with pytest.raises(ValueError, match="restart_every"):
        TrainingArguments(str(tmp_path), schedule="jagged_cosine")
    with pytest.raises(Exception, match="restart_every is 4 in the checkpoint but 5"):
        Schedule("jagged_cosine", 2, 12, restart_every=5).load_state_dict(
            Schedule("jagged_cosine", 2, 12, restart_every=4).state_dict())


@settings(max_examples=50, deadline=None)
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9)), ratio=st.floats(0, 1), seed=st.integers(0, 2**16),
       ties=st.booleans())
def test_pruning_keeps_exactly_the_top_share_by_magnitude(shape, ratio, seed, ties):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    if ties:
        x = np.round(x)
    keep = magnitude_mask(x, ratio)
    k = int(round((1 - ratio) * x.size))
    assert keep.sum() == k
    if 0 < k < x.size:
        assert np.abs(x[keep]).min() >= np.abs(x[~keep]).max()


def test_the_optimizer_state_of_the_lora_parameters_is_pruned_with_one_mask():
    model = relora()
    params = [p for g in model.parameter_groups() for p in g.params]
    other = tiny_model(5).model.norm.weight
    optimizer = AdamW([*model.parameter_groups(), ParameterGroup("other", [other])], lr=1e-3)
    rng = np.random.default_rng(0)
    for p in [*params, other]:
        p.grad = rng.normal(size=p.shape).astype(np.float32)
    optimizer.step()
    optimizer.step()
    before = {k: {n: (v.copy() if n != "step" else v) for n, v in s.items()} for k, s in optimizer.state.items()}
    prune_optimizer_state(optimizer, params, 0.9)
    for key, state in optimizer.state.items():
        if key.startswith("other"):
            assert all(np.array_equal(state[n], before[key][n]) for n in ("exp_avg", "exp_avg_sq"))
            continue
        m0, m = before[key]["exp_avg"], state["exp_avg"]
        keep = m != 0
        assert keep.sum() == round(0.1 * m.size) and np.abs(m0[keep]).min() >= np.abs(m0[~keep]).max()
        np.testing.assert_array_equal(m[keep], m0[keep])
        np.testing.assert_array_equal(state["exp_avg_sq"], np.where(keep, before[key]["exp_avg_sq"], 0))
        assert state["step"] == before[key]["step"] == 2


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_accumulated_update_reaches_rank_min_k_plus_1_times_r(k):
    model, r = relora(r=3), 3
    base = {n: p.data.astype(np.float64) for n, p in model.named_parameters() if "base_layer" in n}
    restart(model, k)
    randomize(model, seed=7)  # the current cycle's B A adds r more
    ranks = accumulated_delta_rank(model)
    for path, layer in adapter_layers(model.get_base_model(), "default"):
        W0 = base[f"base_model.model.{path}.base_layer.weight"]
        A, B = (p.data.astype(np.float64) for p in layer.factors("default"))
        s = layer.scaling["default"]
        now = layer.base_layer.weight.data + (s * (B @ A) if layer.dora_axis == 1 else s * (B @ A).T)
        delta = accumulated_delta(layer, "default")
        np.testing.assert_allclose(delta if layer.dora_axis == 1 else delta.T, now - W0, atol=1e-5)
        assert ranks[path] == min((k + 1) * r, *W0.shape) > r


def test_training_grows_the_rank_past_r(tmp_path):
    data = build_dataset([Record("", t * 3, f"m{i}") for i, t in enumerate(["abcab", "bcad", "cabde", "dab"])],
                         CharTokenizer(), 24)
    model = relora(r=2, reset_every=3, prune_ratio=0.99)
    args = TrainingArguments(str(tmp_path), max_steps=13, batch_size=2, lr=0.02, seq_len=24, progress=False,
                             schedule="jagged_cosine", restart_every=3, restart_warmup_steps=1)
    trainer = Trainer(model, args, data)
    trainer.train()
    assert len(adapter_layers(model.get_base_model(), "default")[0][1].relora_merged["default"]) == 4
    assert min(accumulated_delta_rank(model).values()) > 2
    for state in trainer.optimizer.state.values():  # the last update (index 12) was a restart: pruned
        kept = round(0.01 * state["exp_avg"].size)
        assert np.count_nonzero(state["exp_avg"]) <= kept and np.count_nonzero(state["exp_avg_sq"]) <= kept


def test_save_then_load_reproduces_the_merged_model_bit_for_bit(tmp_path):
    model, ids = relora(), token_ids()
    restart(model, 3)
    randomize(model, seed=9)
    expected = logits(model.eval(), ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "relora_merged.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    np.testing.assert_array_equal(logits(loaded, ids), expected)
    assert accumulated_delta_rank(loaded) == accumulated_delta_rank(model)
    loaded.load_method_state(tmp_path)  # the same merges again: nothing changes
    np.testing.assert_array_equal(logits(loaded, ids), expected)
    other = relora()
    restart(other, 1)
    with pytest.raises(CheckpointError, match="already holds other ReLoRA merges"):
        other.load_method_state(tmp_path)
    fresh = relora()  # before the first restart the file holds no merges (a stale one is replaced)
    fresh.save_pretrained(tmp_path)
    assert read_safetensors(tmp_path / "relora_merged.safetensors") == {}


def test_a_resumed_run_continues_exactly(tmp_path):
    """The merged updates come back from the checkpoint's adapter folder (load_method_state)."""
    data = build_dataset([Record("", t, f"m{i}") for i, t in enumerate(["abcab", "bca", "cabcabc", "ab"])],
                         CharTokenizer(), 16)

    def make(kill=False):
        model = relora(r=2, reset_every=3, lora_dropout=0.1, seed=1)
        real = model.on_step_end

        def end(step):
            real(step)
            if kill and step == 7:
                raise KeyboardInterrupt
        model.on_step_end = end
        return model

    def args(folder):
        return TrainingArguments(str(folder), max_steps=11, batch_size=2, lr=1e-2, save_every=4, progress=False,
                                 seq_len=16, schedule="jagged_cosine", restart_every=3, restart_warmup_steps=1)

    straight = make()
    Trainer(straight, args(tmp_path / "a"), data).train()
    with pytest.raises(KeyboardInterrupt):
        Trainer(make(kill=True), args(tmp_path / "b"), data).train()
    resumed = make()  # from checkpoint-4: one restart (after update 4) is in its adapter folder
    Trainer(resumed, args(tmp_path / "b"), data).train(resume=True)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(a.data, b.data), name


def test_config_and_target_errors():
    for bad, field in (({"reset_every": 0}, "reset_every"), ({"prune_ratio": 1.5}, "prune_ratio"),
                       ({"use_dora": True}, "use_dora"), ({"init_lora_weights": "pissa"}, "init_lora_weights")):
        with pytest.raises(ConfigError, match=field):
            ReLoraConfig(**bad)
    assert (ReLoraConfig().r, ReLoraConfig().lora_alpha, ReLoraConfig().prune_ratio) == (128, 32, 0.99)
    tied = tiny_model(tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="tied"):
        get_peft_model(tied, ReLoraConfig(r=2, target_modules=["embed_tokens"]))


def test_cli_trains_with_restarts_and_the_jagged_schedule(capsys, tmp_path):
    data, out = small_data(tmp_path), tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", data, "--out", out, "--method", "relora", "--r", 2,
                            "--relora-every", 2, "--relora-prune", 0.99, "--schedule", "jagged_cosine",
                            "--restart-warmup", 1, *TRAIN[:-2], "--warmup", 0)
    assert code == 0, err
    assert "relora: 1 restarts; rank of the total update W - W0 per module: min 4, max 4 (r = 2)" in stdout
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "RELORA"
    assert (out / "relora_merged.safetensors").exists()
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--out", tmp_path / "merged")
    assert code == 0, err
