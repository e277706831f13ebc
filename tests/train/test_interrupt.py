"""Nothing lost: Ctrl-C saves the step reached and a resume continues bit for bit; a diverged
run never writes a checkpoint with insane weights and stops in one line; a full disk while
saving leaves the older checkpoints as they were."""
from __future__ import annotations

import errno
import json
import os
import signal
import warnings

import numpy as np
import pytest

import minipeft.train.checkpoint as ckpt
from minipeft.errors import CheckpointError
from minipeft.train import Trainer, TrainingArguments, TrainingError, build_dataset, find_latest_checkpoint
from minipeft.train.data import Record
from minipeft.train.progress import TrainingInterrupted
from tests.train.train_helpers import CharTokenizer, FakeAdapter

STEPS = 6


def _data():
    texts = ["abcab", "bca", "cabcabc", "ab", "bcabca"]
    return build_dataset([Record("", t, f"mem, line {i + 1}") for i, t in enumerate(texts)], CharTokenizer(), 16)


def _args(folder, **kw):
    base = dict(max_steps=STEPS, batch_size=2, lr=1e-2, save_every=0, log_every=1, progress=False, seq_len=16,
                grad_accum_steps=2, schedule="cosine", warmup_steps=2)
    return TrainingArguments(str(folder), **{**base, **kw})


def _same(a: FakeAdapter, b: FakeAdapter) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(x.data, y.data), name
    assert a.rng.bit_generator.state == b.rng.bit_generator.state


def _straight(tmp_path) -> FakeAdapter:
    model = FakeAdapter()
    Trainer(model, _args(tmp_path / "straight"), _data()).train()
    return model


def _resume_and_compare(tmp_path, folder, straight):
    resumed = FakeAdapter()
    summary = Trainer(resumed, _args(folder), _data()).train(resume=True)
    assert summary["step"] == STEPS
    _same(straight, resumed)
    return summary


class RaiseInForward(FakeAdapter):
    """Ctrl-C as Python delivers it mid-update: a KeyboardInterrupt from the forward of update ``at``
    (0-based), second micro-batch: the data cursor and the dropout generator have moved on already."""

    def __init__(self, at):
        super().__init__()
        self.at, self.forwards = at, 0

    def forward(self, *args, **kw):
        self.forwards += 1
        if self.forwards == 2 * self.at + 2:
            raise KeyboardInterrupt
        return super().forward(*args, **kw)


def test_an_interrupt_inside_an_update_saves_the_step_before_it_and_resumes_bit_for_bit(tmp_path):
    straight = _straight(tmp_path)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 3: '.*checkpoint-3' holds it") as err:
        Trainer(RaiseInForward(at=3), _args(tmp_path / "b"), _data()).train()
    assert err.value.step == 3 and err.value.checkpoint.name == "checkpoint-3"
    assert isinstance(err.value, KeyboardInterrupt)  # what code that catches Ctrl-C expects
    assert find_latest_checkpoint(tmp_path / "b").name == "checkpoint-3"
    assert _resume_and_compare(tmp_path, tmp_path / "b", straight)["steps_run"] == STEPS - 3


class SigintAtStepEnd(FakeAdapter):
    """A real Ctrl-C (SIGINT to this process) while update ``at`` (0-based) is being applied."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_step_end(self, step):
        super().on_step_end(step)
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name == "nt", reason="POSIX signals")
def test_ctrl_c_is_deferred_to_the_end_of_the_update_saved_and_resumed_bit_for_bit(tmp_path, capsys):
    straight = _straight(tmp_path)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3") as err:
        Trainer(SigintAtStepEnd(at=2), _args(tmp_path / "b"), _data()).train()
    assert err.value.step == 3  # update 3 (hook step 2) was finished, then saved
    assert "stopping after this step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    _resume_and_compare(tmp_path, tmp_path / "b", straight)


def test_an_interrupt_while_the_weights_change_saves_nothing_and_says_so(tmp_path):
    straight = _straight(tmp_path)
    run = tmp_path / "b"
    Trainer(FakeAdapter(), _args(run, max_steps=2), _data()).train()  # checkpoint-2 ...
    half = FakeAdapter(fail_at_step=4)  # ... continued, and killed inside on_step_end of update 5
    with pytest.raises(TrainingInterrupted, match=r"during update 5, while the weights were being changed: nothing "
                                                  r"saved, '.*checkpoint-2' is kept"):
        with pytest.warns(UserWarning, match="max_steps=2 -> 6"):
            Trainer(half, _args(run), _data()).train(resume=True)
    assert find_latest_checkpoint(run).name == "checkpoint-2"
    with pytest.warns(UserWarning, match="new schedule"):
        _resume_and_compare(tmp_path, run, straight)  # from checkpoint-2, with the schedule of 6 steps


class DivergesAt(FakeAdapter):
    """After update ``at`` (0-based) the bias holds 1e37: finite, the loss may still be finite."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_step_end(self, step):
        if step == self.at:
            self.bias.data = np.full_like(self.bias.data, 1e37)


def test_diverged_weights_are_never_saved_and_the_stop_is_one_line_with_a_lower_lr(tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingError) as err:
            Trainer(DivergesAt(at=2), _args(run, save_every=1, lr=0.02), _data()).train()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("step 3: the trainable weights have diverged (values up to 1e+37); nothing saved; ")
    assert "checkpoint-2' (finite weights) is kept" in message
    assert "resume=True with lr=0.002" in message  # a tenth of the learning rate that diverged
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]  # no overflow warnings
    assert find_latest_checkpoint(run).name == "checkpoint-2"
    for folder in run.glob("checkpoint-*"):  # no checkpoint holds the 1e37s
        from minipeft.io.safetensors import read_safetensors
        weights = read_safetensors(folder / "trainable.safetensors")
        assert all(np.isfinite(w).all() and np.abs(w).max() < 1e6 for w in weights.values()), folder
    # the advice works: the run continues from checkpoint-2 with the lower learning rate
    summary = Trainer(FakeAdapter(), _args(run, save_every=1, lr=0.002), _data()).train(resume=True)
    assert summary["step"] == STEPS and np.isfinite(summary["train_loss"])


def test_a_full_disk_while_saving_is_one_error_and_the_older_checkpoint_is_untouched(tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(FakeAdapter(), _args(run, max_steps=2), _data()).train()
    before = {p.relative_to(run): p.read_bytes() for p in (run / "checkpoint-2").rglob("*") if p.is_file()}
    real = ckpt.write_safetensors

    def disk_full(path, tensors, metadata=None):
        if path.name == "optimizer.safetensors":  # the second file of a checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "write_safetensors", disk_full)
    with pytest.raises(CheckpointError) as err, pytest.warns(UserWarning, match="new schedule"):
        Trainer(FakeAdapter(), _args(run, max_steps=4), _data()).train(resume=True)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback
    assert "checkpoint-4': no space left on device" in str(err.value) and "checkpoint-2' is kept" in str(err.value)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert {p.relative_to(run): p.read_bytes() for p in (run / "checkpoint-2").rglob("*") if p.is_file()} == before
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
