"""Learning-rate schedules: pure functions  step -> multiplier  of the base learning rate.

``step`` counts the updates already applied (0 for the first update), the convention of
transformers' ``get_*_schedule_with_warmup`` driven by its Trainer; so with warmup the
first update has multiplier 0. With W warmup steps and T total steps::

    warmup (s < W):  m(s) = s / W
    constant:        m(s) = 1
    linear:          m(s) = max(0, (T − s) / (T − W))
    cosine:          m(s) = max(0, ½·(1 + cos(π · (s − W) / (T − W))))
    jagged_cosine:   ReLoRA's cosine with warm restarts, see :func:`jagged_cosine`

(denominators are clamped to at least 1, as in transformers). :class:`Schedule` binds the
kind and the step counts, and carries its position for checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CheckpointError


def _warmup(step: int, warmup_steps: int) -> float:
    return step / max(1, warmup_steps)


def constant(step: int, warmup_steps: int = 0, total_steps: int | None = None) -> float:
    """1 after a linear warmup (transformers' get_constant_schedule_with_warmup)."""
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


def linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then linear decay to 0 at ``total_steps`` (get_linear_schedule_with_warmup)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then half a cosine down to 0 (get_cosine_schedule_with_warmup, 0.5 cycles)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def jagged_cosine(step: int, warmup_steps: int, total_steps: int, restart_every: int,
                  restart_warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """ReLoRA's jagged cosine (Lialin et al., 2023, arXiv:2307.05695, §3; the code's
    ``cosine_restarts``, REFERENCE 2.6). With W warmup steps, T total, N = restart_every,
    R = restart_warmup_steps, ρ = min_lr_ratio, k = s mod N, n = ⌊s / N⌋::

        c(t) = ρ + (1 − ρ) · ½ (1 + cos(π (t − W) / (T − W)))       one cosine over the run
        m(s) = s / W                          s < W                 (the first warmup)
             = (k / R) · c(n N + R)           k < R and s ≥ N       (re-warmup after a restart,
                                                                     up to the cosine's value)
             = c(s)                           otherwise

    so m = 0 at every restart s = n N (n ≥ 1), the step after which ReLoRA merges. The
    code's ``adjust_step`` (for runs continued from a warm start) is 0 here; the code
    asks T to be a multiple of N, which is not required here.
    """
    def c(t):
        progress = (t - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    k, n = step % restart_every, step // restart_every
    if k < restart_warmup_steps and step >= restart_every:
        return k / max(1, restart_warmup_steps) * c(n * restart_every + restart_warmup_steps)
    return c(step)


SCHEDULES = {"constant": constant, "linear": linear, "cosine": cosine, "jagged_cosine": jagged_cosine}
JAGGED_FIELDS = ("restart_every", "restart_warmup_steps", "min_lr_ratio")  # jagged_cosine's extra arguments


@dataclass
class Schedule:
    """A schedule bound to its step counts; ``schedule()`` is the multiplier at ``self.step``."""

    kind: str
    warmup_steps: int
    total_steps: int
    step: int = 0  # updates applied so far
    restart_every: int = 0  # jagged_cosine only (JAGGED_FIELDS)
    restart_warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        for name in ("warmup_steps", "total_steps", "step", "restart_every", "restart_warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"schedule {name} must be an integer >= 0, got {value!r}")
        if self.kind == "jagged_cosine":
            if self.restart_every < max(1, self.warmup_steps, self.restart_warmup_steps):
                raise ValueError(f"jagged_cosine needs restart_every >= 1 and >= warmup_steps and "
                                 f"restart_warmup_steps, got {self.restart_every!r}")
            if not 0 <= self.min_lr_ratio <= 1:
                raise ValueError(f"schedule min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")

    def _extra(self) -> tuple:
        return tuple(getattr(self, n) for n in JAGGED_FIELDS) if self.kind == "jagged_cosine" else ()

    def multiplier(self, step: int | None = None) -> float:
        s = self.step if step is None else step
        return SCHEDULES[self.kind](s, self.warmup_steps, self.total_steps, *self._extra())

    __call__ = multiplier

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"kind": self.kind, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "step": self.step, **dict(zip(JAGGED_FIELDS, self._extra()))}

    def load_state_dict(self, state: dict, source: str = "schedule state") -> None:
        """Take the saved position; the shape of the schedule must be the one this run uses."""
        for name in ("kind", "warmup_steps", "total_steps") + (JAGGED_FIELDS if self._extra() else ()):
            if state.get(name) != getattr(self, name):
                raise CheckpointError(f"{source}: {name} is {state.get(name)!r} in the checkpoint but "
                                      f"{getattr(self, name)!r} in this run; resuming would change the schedule")
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"{source}: step must be an integer >= 0, got {step!r}")
        self.step = step
