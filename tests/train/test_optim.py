"""AdamW / SGD / clip_grad_norm against torch, over several steps and parameter groups."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft.backend import to_numpy
from minipeft.errors import CheckpointError
from minipeft.nn import Parameter, ParameterGroup
from minipeft.train import SGD, AdamW, clip_grad_norm

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grads = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(6)]
    return arrays, grads


def _groups(arrays, to_backend=np.asarray):
    ps = [Parameter(to_backend(a.copy())) for a in arrays]
    return ps, [ParameterGroup("a", ps[:2], lr=0.05), ParameterGroup("b", ps[2:], weight_decay=0.3)]


def _run_ours(make, arrays, grads, scales, to_backend=np.asarray, skip=None):
    ps, groups = _groups(arrays, to_backend)
    opt = make(groups)
    for t, (gs, scale) in enumerate(zip(grads, scales)):
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad = None if skip == (t, i) else to_backend(g.copy())
        opt.lr_scale = scale
        opt.step()
        opt.zero_grad()
    return [to_numpy(p.data) for p in ps], opt


def _run_torch(torch, make, arrays, grads, scales, skip=None):
    ps = [torch.nn.Parameter(torch.tensor(a)) for a in arrays]
    opt = make([{"params": ps[:2], "lr": 0.05}, {"params": ps[2:], "weight_decay": 0.3}])
    base = [g["lr"] for g in opt.param_groups]
    for t, (gs, scale) in enumerate(zip(grads, scales)):
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad = None if skip == (t, i) else torch.tensor(g)
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * scale
        opt.step()
    return [p.detach().numpy() for p in ps]


SCALES = [0.0, 0.5, 1.0, 1.0, 0.7, 0.2]


@pytest.mark.parametrize("kind", ["adamw", "sgd", "sgd_momentum", "sgd_nesterov"])
def test_matches_torch(kind):
    torch = pytest.importorskip("torch", reason="torch is the oracle")
    arrays, grads = _setup()
    ours, theirs = {
        "adamw": (lambda g: AdamW(g, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                  lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
        "sgd": (lambda g: SGD(g, lr=0.1, weight_decay=0.01), lambda g: torch.optim.SGD(g, lr=0.1, weight_decay=0.01)),
        "sgd_momentum": (lambda g: SGD(g, lr=0.1, momentum=0.9, weight_decay=0.01),
                         lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=0.01)),
        "sgd_nesterov": (lambda g: SGD(g, lr=0.1, momentum=0.9, nesterov=True),
                         lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True)),
    }[kind]
    got, _ = _run_ours(ours, arrays, grads, SCALES, skip=(2, 1))  # one param skips a step
    want = _run_torch(torch, theirs, arrays, grads, SCALES, skip=(2, 1))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_adamw_defaults_match_torch():
    torch = pytest.importorskip("torch", reason="torch is the oracle")
    opt, ref = AdamW([Parameter(np.zeros(1, np.float32))]), torch.optim.AdamW([torch.zeros(1)])
    d = ref.defaults
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay) == (d["lr"], d["betas"], d["eps"], d["weight_decay"])


def test_adamw_first_step_closed_form(backend):
    """t = 1: m̂ = g, v̂ = g², so p ← p(1 − lr·λ) − lr·g/(|g| + ε); runs on every backend."""
    p0 = np.array([1.0, -2.0, 0.5], np.float32)
    g = np.array([0.3, -0.1, 0.0], np.float32)
    p = Parameter(backend(p0.copy()))
    p.grad = backend(g.copy())
    AdamW([p], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(to_numpy(p.data), p0 * (1 - 0.05) - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-6)


def test_state_dict_round_trip_continues_identically():
    arrays, grads = _setup(1)
    make = lambda g: AdamW(g, lr=1e-2)  # noqa: E731
    straight, _ = _run_ours(make, arrays, grads, [1.0] * 6)
    first, opt = _run_ours(make, arrays, grads[:3], [1.0] * 3)
    state = opt.state_dict()
    ps, groups = _groups(first)
    resumed = make(groups)
    resumed.load_state_dict(state)
    for gs in grads[3:]:
        for p, g in zip(ps, gs):
            p.grad = g.copy()
        resumed.step()
    for a, b in zip(straight, ps):
        np.testing.assert_array_equal(a, b.data)  # bit for bit


def test_load_state_dict_names_the_mismatch():
    arrays, grads = _setup()
    _, opt = _run_ours(lambda g: AdamW(g), arrays, grads[:1], [1.0])
    state = opt.state_dict()
    state["state"]["b/0"]["exp_avg"] = np.zeros((9,), np.float32)
    _, groups = _groups(arrays)
    fresh = AdamW(groups)
    with pytest.raises(CheckpointError, match=r"b/0/exp_avg has shape \(9,\).*\(2, 3, 2\)"):
        fresh.load_state_dict(state)
    assert fresh.state == {}  # nothing was half-loaded
    with pytest.raises(CheckpointError, match="'zz/0' names no parameter"):
        fresh.load_state_dict({"type": "AdamW", "state": {"zz/0": {"step": 1}}})
    with pytest.raises(CheckpointError, match="optimizer 'SGD'"):
        fresh.load_state_dict({"type": "SGD", "state": {}})


def test_groups_are_validated():
    p = Parameter(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="named 'x'"):
        AdamW([ParameterGroup("x", [p]), ParameterGroup("x", [])])
    with pytest.raises(ValueError, match="more than one place"):
        AdamW([ParameterGroup("x", [p]), ParameterGroup("y", [p])])
    assert AdamW([p]).groups[0].params == [p]  # a plain list becomes one group


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    torch = pytest.importorskip("torch", reason="torch is the oracle")
    _, grads = _setup(2)
    ps = [Parameter(np.zeros_like(g)) for g in grads[0]]
    for p, g in zip(ps, grads[0]):
        p.grad = g.copy()
    tps = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads[0]]
    for p, g in zip(tps, grads[0]):
        p.grad = torch.tensor(g)
    total = clip_grad_norm([ParameterGroup("g", ps)], max_norm)
    want = torch.nn.utils.clip_grad_norm_(tps, max_norm)
    assert total == pytest.approx(float(want), rel=1e-6)
    for p, t in zip(ps, tps):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_state_for_is_the_live_per_parameter_state():
    arrays, grads = _setup()
    ps, groups = _groups(arrays)
    outside = Parameter(np.zeros(3, np.float32))
    opt = AdamW(groups, lr=0.1)
    assert opt.state_for(ps[0]) is None and opt.state_for(outside) is None  # before its first update
    for p, g in zip(ps, grads[0]):
        p.grad = g.copy()
    ps[1].grad = None  # no gradient: no update, no state
    opt.step()
    state = opt.state_for(ps[2])
    assert state is opt.state["b/0"] and state["step"] == 1 and set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state_for(ps[1]) is None and opt.state_for(outside) is None
    state["exp_avg"][...] = 0  # editing it edits the optimizer (what ReLoRA's pruning relies on)
    assert not opt.state_dict()["state"]["b/0"]["exp_avg"].any()
    sgd = SGD(groups, lr=0.1, momentum=0.9)
    for p, g in zip(ps, grads[1]):
        p.grad = g.copy()
    sgd.step()
    assert set(sgd.state_for(ps[0])) == {"step", "momentum_buffer"}
