"""LR schedules against their closed forms and, when installed, transformers' own."""
from __future__ import annotations

import math

import pytest

from minipeft.errors import CheckpointError
from minipeft.train import Schedule, constant, cosine, linear

W, T = 4, 20


def test_closed_forms():
    for s in range(W):
        for f in (constant, linear, cosine):
            assert f(s, W, T) == pytest.approx(s / W)
    assert constant(W, W, T) == constant(T + 5, W, T) == 1.0
    assert linear(W, W, T) == 1.0 and linear(12, W, T) == pytest.approx(8 / 16) and linear(T, W, T) == 0.0
    assert cosine(W, W, T) == 1.0 and cosine(12, W, T) == pytest.approx(0.5) and cosine(T, W, T) == pytest.approx(0.0)
    assert cosine(8, W, T) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 16)))
    assert linear(T + 3, W, T) == 0.0 and cosine(T + 3, W, T) >= 0.0  # never negative past the end
    assert constant(0) == linear(0, 0, T) == cosine(0, 0, T) == 1.0  # no warmup: full lr at once


def test_matches_transformers():
    torch = pytest.importorskip("torch", reason="transformers' schedules need torch")
    tf = pytest.importorskip("transformers", reason="transformers is the oracle")
    for ours, make in [
        (constant, lambda o: tf.get_constant_schedule_with_warmup(o, W)),
        (linear, lambda o: tf.get_linear_schedule_with_warmup(o, W, T)),
        (cosine, lambda o: tf.get_cosine_schedule_with_warmup(o, W, T)),
    ]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = make(opt)
        for s in range(T + 2):
            assert ours(s, W, T) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), (ours.__name__, s)
            opt.step()
            sched.step()


def test_schedule_object_state():
    sched = Schedule("cosine", W, T)
    for _ in range(7):
        sched.advance()
    assert sched() == cosine(7, W, T)
    other = Schedule("cosine", W, T)
    other.load_state_dict(sched.state_dict())
    assert other.step == 7
    with pytest.raises(CheckpointError, match="total_steps is 20 in the checkpoint but 30"):
        Schedule("cosine", W, 30).load_state_dict(sched.state_dict())
    with pytest.raises(ValueError, match="schedule must be one of"):
        Schedule("exp", W, T)
