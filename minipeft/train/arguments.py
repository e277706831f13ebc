"""`TrainingArguments`: every setting of a training run, frozen and validated when built.

A bad value raises :class:`~minipeft.errors.ConfigError` (a ``ValueError``) naming the
field; the error also carries ``field``, ``expected`` and ``value`` so that a front end (the
CLI) can say it in its own words (``--steps`` rather than ``max_steps``). Counts are in
optimizer updates ("steps"); ``batch_size`` is the micro-batch, so one update sees
``batch_size × grad_accum_steps`` examples.

``warmup_steps`` follows transformers (v5): an integer is a number of steps, a float in
[0, 1) a share of ``max_steps`` (rounded up), so a default given as a share never makes a
short run fail. A warmup longer than the run is allowed (as in transformers): the learning
rate then never reaches ``lr``; the trainer says so.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import ConfigError
from .schedules import SCHEDULES


@dataclass(frozen=True)
class TrainingArguments:
    output_dir: str
    max_steps: int = 100  # optimizer updates
    batch_size: int = 4  # examples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per update
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int | float = 0  # steps, or a share of max_steps when a float in [0, 1)
    schedule: str = "linear"  # "constant" | "linear" | "cosine" | "jagged_cosine"
    restart_every: int = 0  # jagged_cosine: the LR restarts every this many steps (ReLoRA's reset_every)
    restart_warmup_steps: int = 0  # jagged_cosine: the warmup after each restart
    min_lr_ratio: float = 0.1  # jagged_cosine: the cosine's floor, as a share of lr
    max_grad_norm: float | None = 1.0  # None: no clipping
    optimizer: str = "adamw"  # "adamw" | "sgd"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    momentum: float = 0.0  # SGD only
    seed: int = 0  # data order (and the eval split of a file)
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batch_size: int | None = None  # None: batch_size
    save_every: int = 0  # 0: save only at the end
    keep_checkpoints: int | None = 2  # None: keep all
    log_every: int = 10
    seq_len: int = 512
    packing: bool = False
    eval_fraction: float = 0.0  # held out of a train *file* when no eval data is given
    progress: bool = True  # a tqdm bar on a terminal, else a plain line every log_every steps
    threads: int | None = None  # BLAS threads while training; None: minipeft.threads' default

    @property
    def num_warmup_steps(self) -> int:
        """The warmup in steps (a float ``warmup_steps`` is a share of ``max_steps``, rounded up)."""
        if isinstance(self.warmup_steps, float):
            return math.ceil(self.max_steps * self.warmup_steps)
        return self.warmup_steps

    def __post_init__(self):
        def fail(name, expected):
            error = ConfigError(f"TrainingArguments.{name} must be {expected}, got {getattr(self, name)!r}")
            error.field, error.expected, error.value = name, expected, getattr(self, name)
            raise error

        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            fail("output_dir", "a folder path")
        object.__setattr__(self, "output_dir", str(self.output_dir))
        for name, low in (("max_steps", 1), ("batch_size", 1), ("grad_accum_steps", 1),
                          ("seed", 0), ("eval_every", 0), ("save_every", 0), ("log_every", 1), ("seq_len", 2),
                          ("restart_every", 0), ("restart_warmup_steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                fail(name, f"an integer >= {low}")
        warmup = self.warmup_steps
        if isinstance(warmup, bool) or not (isinstance(warmup, int) and warmup >= 0
                                            or isinstance(warmup, float) and 0 <= warmup < 1):
            fail("warmup_steps", "an integer >= 0 (steps) or a number in [0, 1) (a share of the steps)")
        for name in ("eval_batch_size", "keep_checkpoints", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                fail(name, "None or an integer >= 1")
        for name in ("lr", "weight_decay", "adam_eps", "momentum"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 <= value < math.inf):
                fail(name, "a finite number >= 0")
        if not self.lr > 0:
            fail("lr", "> 0")
        if not self.momentum < 1:
            fail("momentum", "in [0, 1)")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and 0 < self.max_grad_norm < math.inf):
            fail("max_grad_norm", "None or a finite number > 0")
        if self.schedule not in SCHEDULES:
            fail("schedule", " | ".join(repr(s) for s in SCHEDULES))
        if self.schedule == "jagged_cosine":
            if self.restart_every < max(1, self.num_warmup_steps, self.restart_warmup_steps):
                fail("restart_every", "an integer >= 1, >= warmup_steps and >= restart_warmup_steps "
                                      "with schedule='jagged_cosine'")
            if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
                fail("min_lr_ratio", "a number in [0, 1]")
        if self.optimizer not in ("adamw", "sgd"):
            fail("optimizer", "'adamw' | 'sgd'")
        if len(tuple(self.adam_betas)) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            fail("adam_betas", "two numbers in [0, 1)")
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        if not (isinstance(self.eval_fraction, (int, float)) and 0 <= self.eval_fraction < 1):
            fail("eval_fraction", "a number in [0, 1)")
