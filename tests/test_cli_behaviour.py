"""A CLI that says what it does: errors in the command's flags, a default warmup that fits any
run, progress lines in a log, transformers' checkpoint-N folders (and the old step-N ones
resumed), extending a finished run, starting from an adapter, Ctrl-C saved, --version,
info --adapter, every default in --help, --threads, matplotlib's absence said once."""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import minipeft as mp
from minipeft import threads
from minipeft.cli import build_parser, main
from minipeft.cli.common import HelpFormatter
from minipeft.cli.train import in_flag_words
from minipeft.io.safetensors import read_safetensors
from minipeft.train import TrainingArguments
from minipeft.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "zoe_stories.jsonl"
FAST = ("--batch-size", 4, "--seq-len", 64, "--eval-every", 0, "--save-every", 2)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(DATA.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")
    return path


def _one_error_line(code, stdout, err):
    assert code == 1 and stdout == "", err
    assert err.startswith("minipeft: error:") and err.count("\n") == 1, err
    return err


# ----- errors in flags, not field names ------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (("--steps", 0), "--steps must be an integer >= 1, got 0"),
    (("--steps", -3), "--steps must be an integer >= 1, got -3"),
    (("--seed", -1), "--seed must be an integer >= 0, got -1"),
    (("--seq-len", 0), "--seq-len must be an integer >= 2, got 0"),
    (("--eval-fraction", 1.5), "--eval-fraction must be a number in [0, 1), got 1.5"),
    (("--warmup", 1.5), "--warmup must be an integer >= 0 (steps) or a number in [0, 1)"),
    (("--batch-size", 0), "--batch-size must be an integer >= 1, got 0"),
    (("--grad-accum", 0), "--grad-accum must be an integer >= 1, got 0"),
    (("--max-grad-norm", 0), "--max-grad-norm must be None or a finite number > 0"),
    (("--log-every", 0), "--log-every must be an integer >= 1, got 0"),
])
def test_a_bad_training_flag_is_one_line_naming_the_flag_before_anything_is_done(capsys, tmp_path, data, flags,
                                                                                   named):
    out = tmp_path / "run"
    err = _one_error_line(*run(capsys, "train", "--data", data, "--out", out, *flags))
    assert named in err and "TrainingArguments" not in err
    assert not out.exists()  # refused before the run folder, the model or the data were touched


def test_messages_of_the_training_api_are_said_in_flags():
    assert in_flag_words("TrainingArguments.max_steps must be >= 1") == "--steps must be >= 1"
    assert in_flag_words("pass resume=True to continue, or choose another output_dir") == \
        "pass --resume to continue, or choose another --out"
    assert in_flag_words("resume=True with lr=0.001") == "--resume with --lr 0.001"
    assert in_flag_words("changed settings (seed: 0 -> 1; grad_accum_steps: 1 -> 2)") == \
        "changed settings (--seed: 0 -> 1; --grad-accum: 1 -> 2)"
    assert in_flag_words("the schedule of the seed run") == "the schedule of the seed run"  # prose stays


def test_a_second_run_into_the_same_folder_says_resume_in_flags(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", data, "--out", out, "--steps", 2, *FAST)[0] == 0
    err = _one_error_line(*run(capsys, "train", "--data", data, "--out", out, "--steps", 2, *FAST))
    assert "pass --resume to continue that run, or choose another --out" in err and "resume=True" not in err


@pytest.mark.parametrize("where", ["file", "inside a file", "unwritable"])
def test_an_out_that_cannot_be_a_run_folder_is_one_line_naming_it(capsys, tmp_path, data, monkeypatch, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = {"file": blocker, "inside a file": blocker / "run", "unwritable": tmp_path / "ro" / "run"}[where]
    if where == "unwritable":  # root writes anywhere: the refusal of the OS is simulated
        real = Path.mkdir

        def refuse(self, *args, **kw):
            if self == out:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, *args, **kw)

        monkeypatch.setattr(Path, "mkdir", refuse)
    err = _one_error_line(*run(capsys, "train", "--data", data, "--out", out, "--steps", 1))
    expected = {"file": "is a file, not a folder", "inside a file": f"lies inside '{blocker}', which is a file",
                "unwritable": "cannot be written to (Permission denied)"}[where]
    assert f"--out '{out}'" in err and expected in err
    assert blocker.read_text() == "x"


# ----- the default warmup fits a short run ---------------------------------------------------------

def test_a_short_run_trains_with_the_default_warmup(capsys, tmp_path, data):
    code, stdout, err = run(capsys, "train", "--data", data, "--out", tmp_path / "run", "--steps", 2, *FAST)
    assert code == 0, err
    assert "step 2: train loss" in stdout


def test_warmup_is_steps_or_a_share_of_the_steps_as_in_transformers(tmp_path):
    share = TrainingArguments(str(tmp_path), max_steps=200, warmup_steps=0.05)
    assert share.num_warmup_steps == 10
    assert TrainingArguments(str(tmp_path), max_steps=2, warmup_steps=0.05).num_warmup_steps == 1  # rounded up
    assert TrainingArguments(str(tmp_path), max_steps=2, warmup_steps=7).num_warmup_steps == 7  # allowed
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--out", "o"])
    assert args.warmup == 0.05
    assert parser.parse_args(["train", "--data", "d", "--out", "o", "--warmup", "3"]).warmup == 3


def test_a_warmup_longer_than_the_run_is_one_warning_line(capsys, tmp_path, data):
    code, stdout, err = run(capsys, "train", "--data", data, "--out", tmp_path / "run", "--steps", 2,
                            "--warmup", 30, *FAST)
    assert code == 0, err
    assert "minipeft: warning: --warmup 30 is longer than the run (--steps 2)" in err


# ----- progress ------------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_line_every_log_every_steps_when_stderr_is_not_a_terminal(capsys, tmp_path, data):
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "run", "--steps", 4, "--log-every", 2,
                       *FAST)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all(" loss " in line and " tok/s" in line and " left" in line for line in lines)


def test_on_a_terminal_progress_is_a_bar_and_no_lines(tmp_path, data, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "4", "--log-every", "1",
                 *map(str, FAST)]) == 0
    monkeypatch.undo()
    text = terminal.getvalue()
    assert "train: 100%" in text or "4/4" in text
    assert not any(line.startswith("step 1/4") for line in text.splitlines())


# ----- checkpoints, resume, extend, init ------------------------------------------------------------

def test_checkpoints_are_named_as_transformers_names_them_and_old_step_folders_still_resume(capsys, tmp_path,
                                                                                          data):
    whole, old = tmp_path / "whole", tmp_path / "old"
    args = ("--data", data, "--steps", 4, *FAST)
    assert run(capsys, "train", "--out", whole, *args)[0] == 0
    assert sorted(p.name for p in whole.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # a run written before the rename, stopped after its step-2 checkpoint
    assert run(capsys, "train", "--out", old, *args)[0] == 0
    shutil.rmtree(old / "checkpoint-4")
    (old / "checkpoint-2").rename(old / "step-2")
    (old / "latest").write_text("step-2\n")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (old / name).unlink()
    code, _, err = run(capsys, "train", "--out", old, *args, "--resume")
    assert code == 0, err
    _same_adapter(whole, old)


def _same_adapter(a: Path, b: Path):
    x, y = read_safetensors(a / "adapter_model.safetensors"), read_safetensors(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_a_finished_run_is_extended_with_resume_and_more_steps(capsys, tmp_path, data):
    """With a constant schedule, 4 steps extended to 6 equal one run of 6, bit for bit."""
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    args = ("--data", data, "--schedule", "constant", "--warmup", 0, *FAST)
    assert run(capsys, "train", "--out", straight, *args, "--steps", 6)[0] == 0
    assert run(capsys, "train", "--out", extended, *args, "--steps", 4)[0] == 0
    code, stdout, err = run(capsys, "train", "--out", extended, *args, "--steps", 6, "--resume")
    assert code == 0, err
    assert "minipeft: warning: resuming" in err and "new schedule (--steps 4 -> 6)" in err
    assert "step 6: train loss" in stdout
    _same_adapter(straight, extended)
    events = [json.loads(line) for line in (extended / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e][-1] == 6
    err = _one_error_line(*run(capsys, "train", "--out", extended, *args, "--steps", 3, "--resume"))
    assert "--steps 3 is below the 6 steps" in err and "checkpoint-6" in err


def test_training_starts_from_an_existing_adapter(capsys, tmp_path, data):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run(capsys, "train", "--data", data, "--out", first, "--steps", 2, "--r", 4, "--target", "q_proj,v_proj",
               *FAST)[0] == 0
    code, _, err = run(capsys, "train", "--data", data, "--out", second, "--init-adapter", first, "--steps", 1,
                       "--lr", 1e-12, *FAST)
    assert code == 0, err
    config = json.loads((second / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    a, b = read_safetensors(first / "adapter_model.safetensors"), read_safetensors(second / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # one update of lr 1e-12 from the first adapter's weights
        np.testing.assert_allclose(a[key], b[key], atol=1e-9, err_msg=key)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)  # not a fresh (B = 0) adapter
    err = _one_error_line(*run(capsys, "train", "--data", data, "--out", tmp_path / "third", "--init-adapter", first,
                               "--method", "ia3", "--steps", 1))
    assert f"--init-adapter '{first}' holds a lora adapter" in err and "not --method ia3" in err


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_bit_for_bit(capsys, tmp_path, data, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ("--data", data, "--steps", 4, "--save-every", 0, *FAST[:-2])
    assert run(capsys, "train", "--out", whole, *args)[0] == 0
    real = Trainer._evaluate_and_save

    def ctrl_c_after_update_3(self, run_state):
        real(self, run_state)
        if run_state.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_evaluate_and_save", ctrl_c_after_update_3)
    code, stdout, err = run(capsys, "train", "--out", cut, *args)
    monkeypatch.undo()
    assert code == 130 and stdout == ""
    assert f"minipeft: interrupted at step 3: '{cut / 'checkpoint-3'}' holds it; --resume continues" in err
    code, _, err = run(capsys, "train", "--out", cut, *args, "--resume")
    assert code == 0, err
    _same_adapter(whole, cut)


def test_a_full_disk_is_one_line_and_the_older_checkpoint_stays(capsys, tmp_path, data, monkeypatch):
    import minipeft.train.checkpoint as ckpt

    out = tmp_path / "run"
    real = ckpt.write_safetensors

    def disk_full_at_step_4(path, tensors, metadata=None):
        if ".checkpoint-4." in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "write_safetensors", disk_full_at_step_4)
    code, stdout, err = run(capsys, "train", "--data", data, "--out", out, "--steps", 4, *FAST)
    assert code == 1 and stdout == "" and "Traceback" not in err
    err = err.splitlines()[-1]  # after the lines of the training that went on until then
    assert err.startswith("minipeft: error: could not write checkpoint")
    assert "could not write checkpoint" in err and "no space left on device" in err and "checkpoint-2' is kept" in err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert (out / "latest").read_text().strip() == "checkpoint-2"


# ----- --version, info, --help ------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"minipeft {mp.__version__}"


def test_info_describes_an_adapter(capsys, tmp_path, data):
    out = tmp_path / "run"
    assert run(capsys, "train", "--data", data, "--out", out, "--steps", 1, "--target", "q_proj,v_proj", *FAST)[0] == 0
    code, stdout, err = run(capsys, "info", "--adapter", out)
    assert code == 0, err
    assert "method: LORA" in stdout and "  r: 8" in stdout  # the rank, also at its default
    assert "target_modules: ['q_proj', 'v_proj']" in stdout
    trainable = sum(v.size for v in read_safetensors(out / "adapter_model.safetensors").values())
    assert f"trainable params: {trainable:,d}" in stdout


def _sub_parsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_shows_every_default_of_every_command():
    parser = build_parser()
    commands = _sub_parsers(parser)
    assert {"train", "generate", "merge", "info", "compare", "chat"} <= set(commands)
    for name, sub in commands.items():
        assert sub.formatter_class is HelpFormatter, name
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.option_strings and action.nargs != 0 and not action.required and action.help != argparse.SUPPRESS:
                text = formatter._format_action(action)
                assert "default" in text, f"{name} {action.option_strings[0]}: {text!r}"
        help_text = sub.format_help()
        assert "--threads N" in help_text or "--model" not in help_text, name  # wherever a model is loaded
    train_help = commands["train"].format_help()
    for shown in ("--steps N", "(default: 200)", "(default: 0.05)", "(default: 10)"):
        assert shown in train_help


# ----- threads -----------------------------------------------------------------------------------------

def test_threads_is_a_setting(monkeypatch):
    before = mp.get_num_threads()
    try:
        mp.set_num_threads(1)
        assert mp.get_num_threads() == 1
        with threads.num_threads(2):
            assert mp.get_num_threads() == 2
        assert mp.get_num_threads() == 1  # the block's limit is undone
    finally:
        mp.set_num_threads(before)
    with pytest.raises(mp.ConfigError, match="threads must be an integer >= 1, got 0"):
        mp.set_num_threads(0)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert threads.default_num_threads() == 1
    monkeypatch.setattr(threads, "available_cpus", lambda: 32)
    assert threads.default_num_threads() == 4
    for name in threads.BLAS_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert threads.chosen_num_threads() == 4 and threads.chosen_num_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert threads.chosen_num_threads() is None  # the user's BLAS setting is left alone


def test_threads_flag_sets_the_blas_before_the_command_and_is_checked(capsys, monkeypatch, tmp_path, data):
    seen = []
    monkeypatch.setattr(threads, "_controller", lambda: _Recorder(seen))
    assert run(capsys, "info", "--threads", 3)[0] == 0 and seen == [3]
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--prompt", "x", "--threads", "0"])
    assert exit_.value.code == 2 and "--threads: expected an integer >= 1, got '0'" in capsys.readouterr().err
    seen.clear()
    assert run(capsys, "train", "--data", data, "--out", tmp_path / "run", "--steps", 1, "--threads", 2, *FAST)[0] == 0
    assert seen == [2, 2]  # the command, and the trainer inside it


class _Recorder:
    def __init__(self, seen):
        self.seen = seen

    def limit(self, limits, user_api):
        self.seen.append(limits)
        return _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


# ----- matplotlib is an extra, its absence said once -----------------------------------------------------

def test_without_matplotlib_training_works_and_says_so_once(capsys, tmp_path, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "run", "--steps", 4, "--save-every", 1,
                       *FAST[:-2])
    assert code == 0, err
    assert err.count('matplotlib is not installed') == 1 and 'pip install -e ".[plots]"' in err
    assert not (tmp_path / "run" / "loss.png").exists()
