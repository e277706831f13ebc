"""`TrainingArguments`: every setting of a training run, frozen and validated when built.

A bad value raises :class:`~minipeft.errors.ConfigError` (a ``ValueError``) naming the
field. Counts are in optimizer updates ("steps"); ``batch_size`` is the micro-batch, so
one update sees ``batch_size × grad_accum_steps`` examples.
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
    warmup_steps: int = 0
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
    progress: bool = True  # the tqdm bar (also off when stderr is not a terminal)

    def __post_init__(self):
        def fail(name, expected):
            raise ConfigError(f"TrainingArguments.{name} must be {expected}, got {getattr(self, name)!r}")

        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            fail("output_dir", "a folder path")
        object.__setattr__(self, "output_dir", str(self.output_dir))
        for name, low in (("max_steps", 1), ("batch_size", 1), ("grad_accum_steps", 1), ("warmup_steps", 0),
                          ("seed", 0), ("eval_every", 0), ("save_every", 0), ("log_every", 1), ("seq_len", 2),
                          ("restart_every", 0), ("restart_warmup_steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                fail(name, f"an integer >= {low}")
        for name in ("eval_batch_size", "keep_checkpoints"):
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
            if self.restart_every < max(1, self.warmup_steps, self.restart_warmup_steps):
                fail("restart_every", "an integer >= 1, >= warmup_steps and >= restart_warmup_steps "
                                      "with schedule='jagged_cosine'")
            if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
                fail("min_lr_ratio", "a number in [0, 1]")
        if self.optimizer not in ("adamw", "sgd"):
            fail("optimizer", "'adamw' | 'sgd'")
        if len(tuple(self.adam_betas)) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            fail("adam_betas", "two numbers in [0, 1)")
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        if not 0 <= self.eval_fraction < 1:
            fail("eval_fraction", "in [0, 1)")
        if self.warmup_steps > self.max_steps:
            fail("warmup_steps", f"<= max_steps ({self.max_steps})")
