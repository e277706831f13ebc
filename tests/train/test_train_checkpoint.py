"""Checkpoints: bit-identical resume, atomic writes, pruning, and refusal of a checkpoint that does not fit."""
from __future__ import annotations

import json

import numpy as np
import pytest

import minipeft.train.checkpoint as ckpt
from minipeft.errors import CheckpointError
from minipeft.nn import ParameterGroup
from minipeft.train import Trainer, TrainingArguments, build_dataset, find_latest_checkpoint, load_checkpoint
from minipeft.train.data import Record
from tests.train.train_helpers import CharTokenizer, FakeAdapter, tiny_model


class Killed(Exception):
    pass


def _data():
    texts = ["abcab", "bca", "cabcabc", "ab", "bcabca"]  # 5 examples, batch 2: epochs of 2 + 2 + 1
    return build_dataset([Record("", t, f"mem, line {i + 1}") for i, t in enumerate(texts)], CharTokenizer(), 16)


SETUPS = {  # model factory, extra arguments
    "adapter": (FakeAdapter, dict(optimizer="adamw", max_grad_norm=0.5, schedule="cosine", warmup_steps=2,
                                  grad_accum_steps=2, weight_decay=0.1)),
    "llama": (tiny_model, dict(optimizer="sgd", momentum=0.9, max_grad_norm=None, schedule="linear")),
}


def _args(folder, **kw):
    return TrainingArguments(str(folder), max_steps=7, batch_size=2, lr=1e-2, save_every=3, log_every=1,
                             eval_every=2, progress=False, seq_len=16, **kw)


def _losses(folder):
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e.get("loss"), e.get("eval_loss")) for e in events]


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, setup):
    make, extra = SETUPS[setup]
    data = _data()
    straight = make()
    Trainer(straight, _args(tmp_path / "a", **extra), data, data).train()

    interrupted = make()

    def kill(step):
        if step == 4:  # during the 5th update: after checkpoint-3 was saved, before checkpoint-6
            raise Killed

    interrupted.on_step_end = kill
    with pytest.raises(Killed):
        Trainer(interrupted, _args(tmp_path / "b", **extra), data, data).train()
    assert find_latest_checkpoint(tmp_path / "b").name == "checkpoint-3"

    resumed = make()  # a new process: fresh model (same base weights), fresh trainer
    summary = Trainer(resumed, _args(tmp_path / "b", **extra), data, data).train(resume=True)
    assert summary["steps_run"] == 4 and summary["step"] == 7
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(a.data, b.data), name  # bit for bit
    if setup == "adapter":
        assert straight.rng.bit_generator.state == resumed.rng.bit_generator.state
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # metrics rewritten, not duplicated


def _trained(tmp_path, steps=2, **kw):
    model, data = tiny_model(), _data()
    groups = [ParameterGroup("head", [model.model.norm.weight, model.model.layers[1].mlp.up_proj.weight])]
    args = TrainingArguments(str(tmp_path / "run"), max_steps=steps, batch_size=2, progress=False, seq_len=16, **kw)
    trainer = Trainer(model, args, data, parameter_groups=groups)
    trainer.train()
    return trainer


def test_a_failed_write_leaves_no_trace(tmp_path, monkeypatch):
    trainer = _trained(tmp_path)
    run = tmp_path / "run"
    before = sorted(p.name for p in run.iterdir())
    real = ckpt.write_safetensors

    def failing(path, tensors, metadata=None):
        if path.name == "optimizer.safetensors":
            raise OSError("disk full (simulated)")
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "write_safetensors", failing)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint '.*checkpoint-3': disk full"):
        ckpt.save_checkpoint(run, 3, model=trainer.model, groups=trainer.groups, optimizer=trainer.optimizer,
                             schedule=trainer.schedule, loader=trainer.loader)
    assert sorted(p.name for p in run.iterdir()) == before  # no checkpoint-3, no .checkpoint-3.tmp-*
    assert (run / "latest").read_text().strip() == "checkpoint-2"


def test_pruning_latest_pointer_and_stale_temp_folders(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".checkpoint-9.tmp-dead").mkdir()  # left by a killed run
    _trained(tmp_path, steps=5, save_every=1, keep_checkpoints=2)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-5"]
    assert find_latest_checkpoint(run).name == "checkpoint-5"
    (run / "latest").unlink()
    assert find_latest_checkpoint(run).name == "checkpoint-5"  # falls back to the highest step
    state = json.loads((run / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["data"]["epoch"] == 1 and state["data"]["position"] == 4 and state["extra"]["args"]["max_steps"] == 5


def test_a_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    trainer = _trained(tmp_path)
    model = trainer.model
    other = [ParameterGroup("head", [model.model.norm.weight, model.lm_head.weight])]
    before = [p.data.copy() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=r"missing \['lm_head.weight'\].*unexpected \['model.layers.1.mlp"):
        load_checkpoint(tmp_path / "run" / "checkpoint-2", model=model, groups=other, optimizer=trainer.optimizer,
                        schedule=trainer.schedule, loader=trainer.loader)
    assert all(np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))


def test_hooks_given_to_save_checkpoint_replace_the_model_lookup(tmp_path):
    from minipeft.train import TrainingHooks

    model, data = FakeAdapter(), _data()
    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, batch_size=2, progress=False, seq_len=16)
    trainer = Trainer(model, args, data)
    trainer.train()
    assert (tmp_path / "run" / "checkpoint-1" / "adapter").is_dir()
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["model_rng"] == model.rng.bit_generator.state
    parts = dict(model=model, groups=trainer.groups, optimizer=trainer.optimizer, schedule=trainer.schedule,
                 loader=trainer.loader)
    folder = ckpt.save_checkpoint(tmp_path / "bare", 1, **parts, hooks=TrainingHooks())  # no hooks at all
    assert not (folder / "adapter").exists()
    assert json.loads((folder / "trainer_state.json").read_text())["model_rng"] is None
    before = model.rng.bit_generator.state
    model.rng.random(5)
    load_checkpoint(tmp_path / "run" / "checkpoint-1", **parts, hooks=TrainingHooks())
    assert model.rng.bit_generator.state != before  # the generator was not restored: no rng hook
    load_checkpoint(tmp_path / "run" / "checkpoint-1", **parts)  # looked up on the model: restored
    assert model.rng.bit_generator.state == before
