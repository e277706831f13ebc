"""The training loop: learning, accumulation, hooks, groups, NaN stop, metrics, arguments."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import minipeft as mp
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError, MiniPeftError
from minipeft.nn import ParameterGroup
from minipeft.train import Trainer, TrainingArguments, TrainingError, build_dataset, evaluate
from minipeft.train.data import Record
from tests.train.train_helpers import CharTokenizer, FakeAdapter, tiny_model, write_jsonl

TOK = CharTokenizer()


def _data(texts, seq_len=16):
    return build_dataset([Record("", t, f"mem, line {i + 1}") for i, t in enumerate(texts)], TOK, seq_len)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, lr=1e-2, log_every=1,
                progress=False, seq_len=16)
    return TrainingArguments(**{**base, **kw})


def test_loss_decreases_and_metrics_parse(tmp_path):
    train = _data(["abcabc", "bcabca", "cabcab", "abcabc"])
    summary = Trainer(tiny_model(), _args(tmp_path, max_steps=25, batch_size=4, eval_every=10, log_every=5,
                                          schedule="cosine", warmup_steps=2), train, train).train()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logs = [e for e in events if "loss" in e]
    evals = [e for e in events if "eval_loss" in e]
    assert [e["step"] for e in logs] == [5, 10, 15, 20, 25] and [e["step"] for e in evals] == [10, 20, 25]
    assert set(logs[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"} and logs[0]["tokens_per_s"] > 0
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert summary["step"] == 25 and summary["eval_loss"] == evals[-1]["eval_loss"]
    assert summary["train_loss"] == pytest.approx(logs[-1]["loss"])
    if _has_matplotlib():
        assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulating_two_half_batches_equals_one_batch(tmp_path, optimizer):
    """Equal token counts per micro-batch: (L₁ + L₂)/2 is the mean over all tokens."""
    train = _data(["abcd", "bcda", "cdab", "dabc"])  # every example 5 targets
    results = []
    for i, (bs, accum) in enumerate([(4, 1), (2, 2)]):
        model = tiny_model()
        args = _args(tmp_path / str(i), max_steps=3, batch_size=bs, grad_accum_steps=accum, optimizer=optimizer,
                     max_grad_norm=None, lr=0.05, momentum=0.5 if optimizer == "sgd" else 0.0)
        Trainer(model, args, train).train()
        results.append(model.state_dict())
    changed = 0
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-6, atol=1e-6, err_msg=name)
        changed += not np.array_equal(value, tiny_model().state_dict()[name])
    assert changed == len(results[0])


def test_only_group_parameters_change_and_hooks_run(tmp_path):
    model = tiny_model()
    before = {k: v.copy() for k, v in model.state_dict().items()}  # state_dict() aliases p.data on NumPy
    chosen = [model.model.layers[0].self_attn.q_proj.weight, model.model.norm.weight]
    Trainer(model, _args(tmp_path, max_steps=2), _data(["abc", "cab"]),
            parameter_groups=[ParameterGroup("some", chosen)]).train()
    names = {"model.layers.0.self_attn.q_proj.weight", "model.norm.weight"}
    for name, value in model.state_dict().items():
        assert np.array_equal(value, before[name]) != (name in names), name
    assert all(p.grad is None for p in model.parameters())  # no stale gradients left behind

    fake = FakeAdapter()
    base = {k: v.copy() for k, v in fake.base.state_dict().items()}
    Trainer(fake, _args(tmp_path / "fake", max_steps=3), _data(["abc", "cab"])).train()
    assert all(np.array_equal(v, base[k]) for k, v in fake.base.state_dict().items())
    assert not np.array_equal(fake.bias.data, 0) and not np.array_equal(fake.scale.data, 1)
    assert fake.calls == [(k, s) for s in range(3) for k in ("mask", "end")]
    assert (tmp_path / "fake" / "run" / "checkpoint-3" / "adapter" / "adapter_model.safetensors").is_file()


class NaNAt(FakeAdapter):
    """Its regularizer turns NaN at update ``bad`` (0-based)."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.done = bad, 0

    def regularizer(self):
        return Tensor(np.float32(np.nan)) if self.done == self.bad else super().regularizer()

    def on_step_end(self, step):
        self.done += 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = NaNAt(bad=3)
    args = _args(tmp_path, max_steps=6, save_every=2)
    with pytest.raises(TrainingError, match=r"step 4: the training loss is nan.*checkpoint-2.*is kept") as err:
        Trainer(model, args, _data(["abc", "cab", "bca"])).train()
    assert isinstance(err.value, MiniPeftError)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", "."))) == ["checkpoint-2"]
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    weights = model.bias.data.copy()  # the bad step changed nothing: resuming redoes steps 3 and 4
    fresh = FakeAdapter()
    t = Trainer(fresh, args, _data(["abc", "cab", "bca"]))
    t.train(resume=True)
    assert not np.array_equal(weights, fresh.bias.data)


def test_no_checkpoint_yet_is_said(tmp_path):
    with pytest.raises(TrainingError, match="step 1: .*no checkpoint had been written yet"):
        Trainer(NaNAt(bad=0), _args(tmp_path), _data(["abc"])).train()
    assert not any(p.name.startswith(("checkpoint", ".checkpoint")) for p in (tmp_path / "run").iterdir())


def test_resume_refusals(tmp_path):
    data = _data(["abc"])
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        Trainer(tiny_model(), _args(tmp_path, max_steps=1), data).train(resume=True)
    Trainer(tiny_model(), _args(tmp_path, max_steps=1), data).train()
    with pytest.raises(CheckpointError, match="already holds checkpoints .*checkpoint-1.*resume=True"):
        Trainer(tiny_model(), _args(tmp_path, max_steps=1), data).train()
    with pytest.warns(UserWarning, match=r"new schedule \(max_steps=1 -> 5\)"):  # extended: see test_resume_extend.py
        assert Trainer(tiny_model(), _args(tmp_path, max_steps=5), data).train(resume=True)["steps_run"] == 4


def test_evaluate_weights_tokens():
    model, data = tiny_model(), _data(["a", "abcdefgh"])  # 2 and 9 target tokens
    got = evaluate(model, data, batch_size=1)
    losses = [float(model(e.input_ids[None], labels=e.labels[None]).loss.item()) for e in data.examples]
    assert got["eval_tokens"] == 11
    assert got["eval_loss"] == pytest.approx((2 * losses[0] + 9 * losses[1]) / 11, rel=1e-6)
    assert evaluate(model, data, batch_size=2)["eval_loss"] == pytest.approx(got["eval_loss"], rel=1e-5)
    assert model.training  # evaluation puts the mode back


def test_train_from_a_jsonl_file_with_the_bundled_model(tmp_path):
    path = mp.bundled_model_path()
    model, tok = mp.LlamaForCausalLM.from_pretrained(path), mp.Tokenizer.from_pretrained(path)
    rows = [{"prompt": "Once upon a time", "completion": f" there was a cat number {i}."} for i in range(6)]
    file = write_jsonl(tmp_path / "d.jsonl", rows)
    args = _args(tmp_path, max_steps=2, seq_len=32, eval_fraction=0.34, lr=1e-3)
    trainer = Trainer(model, args, str(file), tokenizer=tok,
                      parameter_groups=[ParameterGroup("head", [model.model.norm.weight])])
    assert len(trainer.train_data) == 4 and len(trainer.eval_data) == 2
    summary = trainer.train()
    assert summary["step"] == 2 and math.isfinite(summary["eval_loss"])


@pytest.mark.parametrize("field, value", [
    ("max_steps", 0), ("batch_size", -1), ("grad_accum_steps", 1.5), ("lr", 0.0), ("lr", math.nan),
    ("schedule", "step"), ("optimizer", "adam"), ("max_grad_norm", 0), ("keep_checkpoints", 0),
    ("warmup_steps", 1.5), ("warmup_steps", -1), ("eval_fraction", 1.0), ("adam_betas", (0.9, 1.0)), ("momentum", 1.0),
])
def test_arguments_are_validated(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"TrainingArguments.{field} must be") as err:
        TrainingArguments(str(tmp_path), **{field: value})
    assert isinstance(err.value, ValueError)


def test_data_longer_than_seq_len_is_refused(tmp_path):
    with pytest.raises(ValueError, match="line 1 has 9 tokens, more than TrainingArguments.seq_len=4"):
        Trainer(tiny_model(), _args(tmp_path, seq_len=4), _data(["abcdefg"]))


def test_resume_with_changed_settings_warns(tmp_path):
    data = _data(["abc", "bca"])
    Trainer(tiny_model(), _args(tmp_path, max_steps=2, save_every=1), data).train()
    (tmp_path / "run" / "checkpoint-2").rename(tmp_path / "run" / "elsewhere")  # resume from checkpoint-1
    (tmp_path / "run" / "latest").write_text("checkpoint-1\n")
    with pytest.warns(UserWarning, match=r"changed settings \(batch_size: 2 -> 1\)"):
        Trainer(tiny_model(), _args(tmp_path, max_steps=2, batch_size=1, lr=5e-3), data).train(resume=True)


def test_a_short_run_on_every_backend(tmp_path, backend):
    """The same loop on NumPy and (with a GPU) CuPy: the weights agree to float32 noise."""
    data = _data(["abcabc", "bcabca", "cab"])
    results = []
    for i, device in enumerate(("cpu", backend.device)):
        model = tiny_model().to(device)
        Trainer(model, _args(tmp_path / str(i), max_steps=3, max_grad_norm=0.1, weight_decay=0.1), data).train()
        assert model.device == device
        results.append(model.state_dict())
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-4, atol=1e-5, err_msg=name)
