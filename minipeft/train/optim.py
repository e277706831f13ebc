"""Optimizers over explicit parameter groups: AdamW and SGD, plus gradient clipping.

AdamW (Loshchilov & Hutter, 2019, arXiv:1711.05101), exactly torch.optim.AdamW's update
for a parameter p with gradient g at its t-th update (t counted per parameter)::

    p ← p − lr·λ·p                          (decoupled weight decay: not part of g)
    m ← β₁·m + (1 − β₁)·g
    v ← β₂·v + (1 − β₂)·g²
    m̂ = m / (1 − β₁ᵗ),   v̂ = v / (1 − β₂ᵗ)
    p ← p − lr·m̂ / (√v̂ + ε)

As in torch, ε is added to √v̂ (after bias correction), not to v̂.

SGD with momentum μ and L2 weight decay λ (torch.optim.SGD, dampening 0)::

    d = g + λ·p
    b ← d at the first update, else  b ← μ·b + d
    d = b  (or  d + μ·b  with nesterov)
    p ← p − lr·d

Groups: each :class:`~minipeft.nn.ParameterGroup` may override ``lr`` and
``weight_decay`` (``None`` = the optimizer's default). The learning rate used at a step is
``group lr × lr_scale``; a trainer sets ``lr_scale`` from its schedule before each
``step()``. Moments live on the parameter's device in the parameter's dtype (as in torch).
"""
from __future__ import annotations

import math

import numpy as np

from ..autograd.tensor import no_grad
from ..backend import get_array_module, to_device, to_numpy
from ..errors import CheckpointError
from ..nn.groups import ParameterGroup


def as_groups(params, default_name: str = "params") -> list[ParameterGroup]:
    """A list of ParameterGroups from groups or from a plain list of Parameters (one group)."""
    params = list(params)
    if all(isinstance(p, ParameterGroup) for p in params) and params:
        groups = params
    elif any(isinstance(p, ParameterGroup) for p in params):
        raise TypeError("pass either ParameterGroups or Parameters, not a mix of both")
    else:
        groups = [ParameterGroup(default_name, params)]
    names, seen = set(), set()
    for group in groups:
        if group.name in names:  # state is keyed by group name
            raise ValueError(f"two parameter groups are named {group.name!r}; names must be unique")
        names.add(group.name)
        for i, p in enumerate(group.params):
            if id(p) in seen:  # it would be updated twice per step
                raise ValueError(f"parameter {group.name}/{i} appears in more than one place in the groups")
            seen.add(id(p))
    return groups


def _key(group: ParameterGroup, index: int) -> str:
    """The state key of a group's index-th parameter (also the checkpoint's: "group/index")."""
    return f"{group.name}/{index}"


class Optimizer:
    """Base class: groups, per-parameter state keyed "group/index", zero_grad, state dicts."""

    state_arrays: tuple[str, ...] = ()  # names of the per-parameter moment arrays

    def __init__(self, params, lr: float, weight_decay: float):
        self.groups = as_groups(params)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.lr_scale = 1.0  # the schedule's multiplier for the next step()
        self.state: dict[str, dict] = {}  # "group/index" -> {"step": int, <array name>: array}
        for group in self.groups:
            for name, value in (("lr", group.lr), ("weight_decay", group.weight_decay)):
                if value is not None and not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"parameter group {group.name!r}: {name} must be a finite number >= 0, got {value!r}")

    def group_lr(self, group: ParameterGroup) -> float:
        """The learning rate the next step() uses for ``group``."""
        return (self.lr if group.lr is None else float(group.lr)) * self.lr_scale

    def group_weight_decay(self, group: ParameterGroup) -> float:
        return self.weight_decay if group.weight_decay is None else float(group.weight_decay)

    def params(self):
        return [p for group in self.groups for p in group.params]

    def state_for(self, param) -> dict | None:
        """The state of ``param`` (found by identity): ``{"step": updates so far, <name>: moment
        array for each of state_arrays}``, the optimizer's own dict (editing its arrays in place
        edits the optimizer), or None while it holds none: before the parameter's first update,
        or when the parameter is not in the groups."""
        for group in self.groups:
            for i, p in enumerate(group.params):
                if p is param:
                    return self.state.get(_key(group, i))
        return None

    def step(self) -> None:
        """Update every parameter that has a gradient, in place, without recording a graph."""
        with no_grad():
            for group in self.groups:
                lr, wd = self.group_lr(group), self.group_weight_decay(group)
                for i, p in enumerate(group.params):
                    if p.grad is None:  # torch skips these too (no state, no step count)
                        continue
                    if not getattr(p.data.flags, "writeable", True):  # e.g. a view of a read-only file buffer
                        p.data = p.data.copy()
                    key = _key(group, i)
                    if key not in self.state:
                        xp = get_array_module(p.data)
                        self.state[key] = {"step": 0, **{n: xp.zeros_like(p.data) for n in self.state_arrays}}
                    state = self.state[key]
                    state["step"] += 1
                    self._update(p.data, p.grad.astype(p.data.dtype, copy=False), state, lr, wd)

    def _update(self, p, g, state, lr, wd):  # pragma: no cover - abstract
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    # ----- state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"type", "state": {"group/index": {"step": int, <moment>: host ndarray}}}."""
        state = {key: {name: (v if name == "step" else to_numpy(v).copy()) for name, v in s.items()}
                 for key, s in self.state.items()}
        return {"type": type(self).__name__, "state": state}

    def load_state_dict(self, state_dict: dict, source: str = "optimizer state") -> None:
        """Restore moments and step counts; every key and shape is checked before anything changes."""
        if state_dict.get("type") != type(self).__name__:
            raise CheckpointError(f"{source} is for optimizer {state_dict.get('type')!r}, "
                                  f"this run uses {type(self).__name__!r}")
        params = {_key(g, i): p for g in self.groups for i, p in enumerate(g.params)}
        new = {}
        for key, s in state_dict.get("state", {}).items():
            if key not in params:
                raise CheckpointError(f"{source}: key {key!r} names no parameter of this optimizer "
                                      f"(groups: {', '.join(g.name for g in self.groups)})")
            step = s.get("step")
            if not isinstance(step, int) or isinstance(step, bool) or step < 1:
                raise CheckpointError(f"{source}: {key}/step must be an integer >= 1, got {step!r}")
            entry = {"step": step}
            for name in self.state_arrays:
                if name not in s:
                    raise CheckpointError(f"{source}: {key} has no {name!r} array")
                array, shape = np.asarray(s[name]), tuple(params[key].shape)
                if array.shape != shape:
                    raise CheckpointError(f"{source}: {key}/{name} has shape {array.shape}, "
                                          f"the parameter has shape {shape}")
                entry[name] = to_device(array.astype(params[key].dtype, copy=True), params[key].device)
            new[key] = entry
        self.state = new


class AdamW(Optimizer):
    """Adam with decoupled weight decay; same update and defaults as torch.optim.AdamW."""

    state_arrays = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        super().__init__(params, lr, weight_decay)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)

    def _update(self, p, g, state, lr, wd):
        beta1, beta2 = self.betas
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if wd:
            p *= 1.0 - lr * wd  # decoupled: shrink p directly, m and v never see it
        m *= beta1
        m += (1.0 - beta1) * g
        v *= beta2
        v += (1.0 - beta2) * (g * g)
        xp = get_array_module(p)
        step_size = lr / (1.0 - beta1 ** t)
        denom = xp.sqrt(v) / math.sqrt(1.0 - beta2 ** t) + self.eps  # √v̂ + ε, as torch orders it
        p -= step_size * (m / denom)


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum; torch.optim.SGD, dampening 0."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        super().__init__(params, lr, weight_decay)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.state_arrays = ("momentum_buffer",) if momentum else ()

    def _update(self, p, g, state, lr, wd):
        d = g + wd * p if wd else g  # L2 decay (coupled, unlike AdamW)
        if self.momentum:
            b = state["momentum_buffer"]
            if state["step"] == 1:
                b[...] = d  # torch starts the buffer at the first gradient, not at zero
            else:
                b *= self.momentum
                b += d
            d = d + self.momentum * b if self.nesterov else b
        p -= lr * d


def _grads(params):
    params = [p for g in params for p in g.params] if params and isinstance(params[0], ParameterGroup) else params
    return [p.grad for p in params if p.grad is not None]


def grad_norm(params) -> float:
    """Global L2 norm of all gradients: √(Σ‖g‖²); NaN/inf propagate."""
    grads = _grads(list(params))
    if not grads:
        return 0.0
    xp = get_array_module(grads[0])
    # per-tensor norms on the device, one transfer to the host (as torch stacks them)
    # at least float32 (a float16 sum of squares overflows at 256); the stack takes the widest dtype
    norms = xp.stack([xp.linalg.norm(g.reshape(-1).astype(np.promote_types(g.dtype, np.float32), copy=False))
                      for g in grads])
    return float(xp.linalg.norm(norms))


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    As torch.nn.utils.clip_grad_norm_: coef = max_norm / (total + 1e-6), clamped at 1
    (the 1e-6 avoids dividing by zero). Returns the total norm before clipping.
    Accepts Parameters or ParameterGroups.
    """
    params = list(params)
    total = grad_norm(params)
    coef = min(max_norm / (total + 1e-6), 1.0)
    if coef < 1.0:  # torch multiplies by the clamped 1.0 too; skipping it changes nothing
        for g in _grads(params):
            g *= coef
    return total
