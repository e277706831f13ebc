"""TrainingHooks: what is found on a model, and the calibration pass (fresh runs only, one ordered
pass over the training data that leaves the training batches and a resume bit-identical)."""
from __future__ import annotations

import dataclasses
import io
import json
import sys

import numpy as np
import pytest

from minipeft.peft import REGISTRY, LoraConfig, get_peft_model, registry
from minipeft.train import Trainer, TrainingArguments, TrainingHooks, build_dataset, iter_batches
from minipeft.train.data import Record
from tests.train.train_helpers import CharTokenizer, FakeAdapter, tiny_model

HOOKS = [f.name for f in dataclasses.fields(TrainingHooks)]


def _data():
    texts = ["abcab", "bca", "cabcabc", "ab", "bcabca"]  # 5 examples: 3 batches of 2, 2, 1
    return build_dataset([Record("", t, f"mem, line {i + 1}") for i, t in enumerate(texts)], CharTokenizer(), 16)


def _args(folder, **kw):
    base = dict(max_steps=4, batch_size=2, lr=1e-2, save_every=2, log_every=1, progress=False, seq_len=16,
                grad_accum_steps=2, max_grad_norm=0.5)
    return TrainingArguments(str(folder), **{**base, **kw})


class Calibrating(FakeAdapter):
    """Records the batches calibrate received, and runs a backward on each (as a Fisher pass would),
    in eval mode so that no dropout mask is drawn from ``rng``."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.calibrated = []  # one list of (input_ids, attention_mask, labels) per calibrate call
        self.mode_seen = None

    def calibrate(self, batches):
        self.mode_seen = self.training
        self.eval()
        seen = []
        for batch in batches:
            seen.append((batch.input_ids.copy(), batch.attention_mask.copy(), batch.labels.copy()))
            self(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
        self.train()
        self.calibrated.append(seen)

    def edit_optimizer_state(self, step, optimizer):
        self.calls.append(("edit", step, optimizer))


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_of_finds_each_hook_or_none():
    assert TrainingHooks.of(object()) == TrainingHooks()
    assert all(getattr(TrainingHooks(), name) is None for name in HOOKS)

    fake = Calibrating()
    hooks = TrainingHooks.of(fake)
    assert hooks.rng is fake.rng and hooks.calibrate == fake.calibrate and hooks.on_step_end == fake.on_step_end
    assert hooks.load_method_state is None  # FakeAdapter has no method state
    with pytest.raises(dataclasses.FrozenInstanceError):
        hooks.calibrate = None

    class Odd:
        calibrate = 3  # not callable: not a hook
        rng = np.random.RandomState(0)  # not a Generator: nothing the checkpoint can save

    assert TrainingHooks.of(Odd()) == TrainingHooks()

    peft_model = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"]))
    found = TrainingHooks.of(peft_model)
    assert all(getattr(found, name) is not None for name in HOOKS)  # a PeftModel has every hook
    assert found.rng is peft_model.rng


def test_calibrate_gets_one_ordered_pass_and_changes_nothing_else(tmp_path):
    data = _data()
    plain, calibrating = FakeAdapter(), Calibrating()
    trainer = Trainer(calibrating, _args(tmp_path / "b"), data)
    Trainer(plain, _args(tmp_path / "a"), data).train()
    trainer.train()

    assert len(calibrating.calibrated) == 1 and calibrating.mode_seen is True
    expected = [(b.input_ids, b.attention_mask, b.labels) for b in iter_batches(data, 2)]
    assert len(calibrating.calibrated[0]) == len(expected) == 3
    for got, want in zip(calibrating.calibrated[0], expected):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    # the loader's generator was not used and the calibration's gradients were cleared: the run is
    # bit for bit the one without calibration
    for (name, a), (_, b) in zip(plain.named_parameters(), calibrating.named_parameters()):
        assert np.array_equal(a.data, b.data), name
    strip = [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in _metrics(tmp_path / "a")]
    assert strip == [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in _metrics(tmp_path / "b")]
    # the other hooks, in order, edit_optimizer_state with the trainer's optimizer
    assert [c[:2] for c in calibrating.calls] == [(k, s) for s in range(4) for k in ("mask", "end", "edit")]
    assert all(c[2] is trainer.optimizer for c in calibrating.calls if c[0] == "edit")


def test_calibrate_is_not_called_on_resume_and_the_resume_is_bit_identical(tmp_path):
    data = _data()
    straight = Calibrating()
    Trainer(straight, _args(tmp_path / "a"), data).train()

    first = Calibrating()

    def kill(step):
        if step == 2:  # after checkpoint-2 was saved
            raise KeyboardInterrupt

    first.on_step_end = kill
    with pytest.raises(KeyboardInterrupt):
        Trainer(first, _args(tmp_path / "b"), data).train()
    assert len(first.calibrated) == 1

    resumed = Calibrating()
    summary = Trainer(resumed, _args(tmp_path / "b"), data).train(resume=True)
    assert summary["steps_run"] == 2 and resumed.calibrated == []
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(a.data, b.data), name
    assert straight.rng.bit_generator.state == resumed.rng.bit_generator.state


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_calibration_progress_bar_only_when_something_calibrates(tmp_path, monkeypatch):
    data = _data()
    for model, folder, shown in [(Calibrating(), "a", True), (FakeAdapter(), "b", False)]:
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        Trainer(model, _args(tmp_path / folder, max_steps=1, progress=True), data).train()
        monkeypatch.undo()
        text = terminal.getvalue()
        assert "train" in text and ("calibrate" in text) == shown, text
        if shown:
            assert "3/3" in text  # one pass: 3 batches


def test_a_peft_model_hands_the_batches_to_its_methods_calibrate(tmp_path, monkeypatch):
    """Through PeftModel.calibrate to the method row's calibrate(peft_model, name, batches);
    a method without one (LoRA as registered) gets nothing and trains as before."""
    data = _data()
    seen = []
    lora = dataclasses.replace(REGISTRY["LORA"], calibrate=lambda pm, name, batches: seen.append(
        (pm, name, [b.input_ids.shape for b in batches])))
    models = [get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"], lora_dropout=0.1)) for _ in "ab"]
    Trainer(models[0], _args(tmp_path / "a"), data).train()
    monkeypatch.setattr(registry, "REGISTRY", {**REGISTRY, "LORA": lora})
    Trainer(models[1], _args(tmp_path / "b"), data).train()
    assert seen == [(models[1], "default", [b.input_ids.shape for b in iter_batches(data, 2)])]
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert np.array_equal(a.data, b.data), name
