"""The training loop: gradient accumulation, hooks, clipping, schedule, eval, checkpoints.

One optimizer update (``step`` = updates already done, 0-based, as the schedule counts)::

    for each of the K = grad_accum_steps micro-batches b:
        L_b = CE_b + R            CE_b: mean cross-entropy over b's target tokens,
                                  R = model.regularizer() when it returns a Tensor
        backward(L_b / K)         so  g = (1/K) Σ_b ∇L_b
    model.mask_gradients(step)    (if the model has it)
    g ← g · min(1, c / (‖g‖ + 1e-6))          (c = max_grad_norm; skipped when None)
    p ← optimizer(p, g, lr = lr_base · schedule(step))
    model.on_step_end(step)       (if the model has it)
    model.edit_optimizer_state(step, optimizer)   (if the model has it: ReLoRA's pruning)

The model's optional hooks are looked up once, as a :class:`~.hooks.TrainingHooks` (hooks.py
says when each is called). Before the first update of a fresh run (not on resume) a model
with ``calibrate`` gets one pass over the training data in file order (calibration: the
selective methods' Fisher scores); it draws nothing from the data loader's generator, so
the training batches are the same with or without it.

Accumulation semantics: the update is the mean of the K micro-batch mean losses, so it
equals one batch of K·B examples exactly when the micro-batches hold equal numbers of
target tokens (otherwise tokens of smaller micro-batches weigh more; the large-batch mean
would weigh every token equally). ``batch_size`` is the micro-batch size.

Step numbers: hooks and the schedule get the 0-based index of the update being made;
``metrics.jsonl``, ``step-N`` folders and error messages count updates done (1-based), so
the update that hook step s belongs to is reported as step s + 1.

Evaluation reports the token-weighted mean loss  L = Σ_b n_b·CE_b / Σ_b n_b  (n_b target
tokens of batch b) and perplexity exp(L). A non-finite loss or gradient norm stops the run
with :class:`TrainingError` before the weights change; no checkpoint is written after it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..autograd.tensor import Tensor, no_grad
from ..errors import CheckpointError, MiniPeftError
from ..nn.groups import ParameterGroup
from .arguments import TrainingArguments
from .batches import BatchLoader, iter_batches
from .checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from .data import Dataset, Example, load_datasets
from .hooks import TrainingHooks
from .metrics import MetricsLog, plot_loss
from .optim import SGD, AdamW, clip_grad_norm, grad_norm
from .schedules import Schedule


class TrainingError(MiniPeftError, RuntimeError):
    """Training cannot go on (a NaN/inf loss or gradient); the message names the step."""


def evaluate(model, data: Dataset, batch_size: int = 8) -> dict:
    """Token-weighted mean loss and perplexity of ``model`` on ``data``, without gradients."""
    was_training = getattr(model, "training", True)
    model.eval()
    total, count = 0.0, 0
    try:
        with no_grad():
            for batch in iter_batches(data, batch_size):
                n = batch.num_targets
                if n:
                    out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
                    total, count = total + float(out.loss.item()) * n, count + n
    finally:
        model.train(was_training)
    loss = total / count if count else math.nan
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return {"eval_loss": loss, "eval_ppl": ppl, "eval_tokens": count}


@dataclass(frozen=True)
class _Update:
    """What one optimizer update reports."""

    loss: float  # mean of the micro-batch losses (regularizer included)
    tokens: int  # real tokens seen
    grad_norm: float  # before clipping
    lr: float  # the base lr times the schedule (a group may scale its own)
    seconds: float


@dataclass
class _Window:
    """Sums over the updates since the last metrics line."""

    loss: float = 0.0
    updates: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Run:
    """What one ``train()`` call tracks from update to update."""

    step: int  # updates done
    start_step: int  # updates done when this call began (the checkpoint resumed from)
    last_saved: Path | None  # the newest checkpoint of this run (named in error messages)
    saved_step: int | None  # the step saved or resumed from by this call; None: no checkpoint to report
    recent: deque  # the last log_every per-update losses, for the summary's train_loss
    window: _Window = field(default_factory=_Window)
    eval_step: int | None = None  # the step of the last evaluation
    last_eval: dict = field(default_factory=lambda: {"eval_loss": None, "eval_ppl": None})


class Trainer:
    """Train ``model``'s parameter groups on ``train_data`` (a Dataset, Examples, or a JSONL path)."""

    def __init__(self, model, args: TrainingArguments, train_data, eval_data=None,
                 parameter_groups: list[ParameterGroup] | None = None, tokenizer=None):
        self.model, self.args = model, args
        if isinstance(train_data, (str, os.PathLike)):
            if tokenizer is None:
                raise ValueError("train_data is a file: pass tokenizer= to tokenise it")
            train_data, split = load_datasets(train_data, tokenizer, args.seq_len, packing=args.packing,
                                              eval_fraction=0.0 if eval_data is not None else args.eval_fraction,
                                              seed=args.seed)
            eval_data = split if eval_data is None else eval_data
        if isinstance(eval_data, (str, os.PathLike)):
            if tokenizer is None:
                raise ValueError("eval_data is a file: pass tokenizer= to tokenise it")
            eval_data = load_datasets(eval_data, tokenizer, args.seq_len, packing=args.packing)[0]
        self.train_data = self._as_dataset(train_data, "train_data")
        self.eval_data = None if eval_data is None else self._as_dataset(eval_data, "eval_data")
        self.hooks = TrainingHooks.of(model)  # looked up once: see hooks.py for when each is called
        if parameter_groups is None:
            parameter_groups = self.hooks.parameter_groups() if self.hooks.parameter_groups else [
                ParameterGroup("trainable", [p for p in model.parameters() if p.requires_grad])]
        self.groups = list(parameter_groups)
        if not any(g.params for g in self.groups):
            raise ValueError("the parameter groups hold no parameters: nothing to train")
        for g in self.groups:
            for i, p in enumerate(g.params):
                if not p.requires_grad:
                    raise ValueError(f"parameter group {g.name!r}, parameter {i}: requires_grad is False, "
                                     "so it would never receive a gradient")

    def _as_dataset(self, data, what: str) -> Dataset:
        if not isinstance(data, Dataset):
            examples = list(data)
            if not all(isinstance(e, Example) for e in examples):
                raise TypeError(f"{what} must be a Dataset, a list of Examples or a JSONL path")
            data = Dataset(examples, pad_id=0, seq_len=self.args.seq_len, name=what)
        if not len(data):
            raise ValueError(f"{what} holds no examples")
        for e in data.examples:
            if len(e.input_ids) > self.args.seq_len:
                raise ValueError(f"{what}: example {e.source} has {len(e.input_ids)} tokens, more than "
                                 f"TrainingArguments.seq_len={self.args.seq_len}")
        return data

    def _optimizer(self):
        a = self.args
        if a.optimizer == "sgd":
            return SGD(self.groups, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
        return AdamW(self.groups, lr=a.lr, betas=a.adam_betas, eps=a.adam_eps, weight_decay=a.weight_decay)

    def train(self, resume: bool = False) -> dict:
        """Run to ``max_steps`` (continuing the latest checkpoint with ``resume=True``); a summary."""
        a = self.args
        Path(a.output_dir).mkdir(parents=True, exist_ok=True)
        self.optimizer = self._optimizer()
        self.schedule = Schedule(a.schedule, a.warmup_steps, a.max_steps, restart_every=a.restart_every,
                                 restart_warmup_steps=a.restart_warmup_steps, min_lr_ratio=a.min_lr_ratio)
        self.loader = BatchLoader(self.train_data, a.batch_size, np.random.default_rng(a.seed))
        self.metrics = MetricsLog(Path(a.output_dir) / "metrics.jsonl")
        run = self._resume() if resume else self._start()
        self.model.train()
        if not resume:
            self._calibrate()
        bar = _progress_bar(a, total=a.max_steps, initial=run.step, desc="train", unit="step")
        try:
            while run.step < a.max_steps:
                update = self._step(run.step, run.last_saved)
                run.step += 1
                self._log(run, update, bar)
                self._evaluate_and_save(run)
        finally:
            bar.close()
            self._zero_grad()  # after an error too: a half-accumulated gradient is never useful
        return self._summary(run)

    def _parts(self) -> dict:
        """What a checkpoint saves and restores."""
        return dict(model=self.model, groups=self.groups, optimizer=self.optimizer, schedule=self.schedule,
                    loader=self.loader, hooks=self.hooks)

    def _start(self) -> _Run:
        """A fresh run: refused when output_dir already holds checkpoints; metrics.jsonl emptied."""
        out = Path(self.args.output_dir)
        last_saved = find_latest_checkpoint(out)
        if last_saved is not None:
            raise CheckpointError(f"'{out}' already holds checkpoints (latest: {last_saved.name}); pass "
                                  "resume=True to continue that run, or choose another output_dir")
        self.metrics.reset()
        return _Run(step=0, start_step=0, last_saved=None, saved_step=None,
                    recent=deque(maxlen=self.args.log_every))

    def _resume(self) -> _Run:
        """Restore the latest checkpoint (model, optimizer, schedule, data cursor, generators)."""
        out = Path(self.args.output_dir)
        last_saved = find_latest_checkpoint(out)
        if last_saved is None:
            raise CheckpointError(f"resume=True, but '{out}' holds no checkpoint (step-N folder)")
        state = load_checkpoint(last_saved, **self._parts())
        step = state["step"]
        _warn_changed_args(self.args, state.get("extra", {}).get("args", {}), last_saved)
        self.metrics.resume(step)
        return _Run(step=step, start_step=step, last_saved=last_saved, saved_step=step,
                    recent=deque(maxlen=self.args.log_every))

    def _calibrate(self) -> None:
        """A fresh run's calibration pass: the model's ``calibrate`` hook gets one pass over the
        training data in file order (the loader's generator is not touched, so the batches of
        training, and a resume, are what they would be without it)."""
        if self.hooks.calibrate is None:
            return
        batches = _calibration_batches(self.train_data, self.args)
        try:
            self.hooks.calibrate(batches)
        finally:
            batches.close()  # closes the progress bar also when calibrate stopped early
            self._zero_grad()  # gradients of a calibration's backward passes are not the first update's

    def _step(self, step: int, last_saved) -> _Update:
        """One optimizer update, the ``step``-th (0-based): accumulate, mask, clip, optimizer step, hooks."""
        a, hooks, t0 = self.args, self.hooks, time.perf_counter()
        loss, tokens = self._accumulate(step, last_saved)
        if hooks.mask_gradients:
            hooks.mask_gradients(step)
        norm = clip_grad_norm(self.groups, a.max_grad_norm) if a.max_grad_norm is not None else grad_norm(self.groups)
        if not math.isfinite(norm):
            raise self._error(step, f"the gradient norm is {norm}", last_saved)
        self.optimizer.lr_scale = self.schedule(step)
        lr = a.lr * self.optimizer.lr_scale  # the base lr; groups may scale their own
        self.optimizer.step()
        if hooks.on_step_end:
            hooks.on_step_end(step)
        if hooks.edit_optimizer_state:  # the optimizer is the trainer's: methods that prune its state (ReLoRA)
            hooks.edit_optimizer_state(step, self.optimizer)
        self._zero_grad()
        self.schedule.advance()
        return _Update(loss, tokens, norm, lr, time.perf_counter() - t0)

    def _log(self, run: _Run, update: _Update, bar) -> None:
        """After update ``run.step`` (1-based): the progress bar, and a metrics line every log_every updates."""
        run.recent.append(update.loss)
        w = run.window
        w.loss, w.updates, w.tokens, w.seconds = (w.loss + update.loss, w.updates + 1, w.tokens + update.tokens,
                                                  w.seconds + update.seconds)
        tok_s = w.tokens / max(w.seconds, 1e-9)
        bar.set_postfix(loss=f"{update.loss:.4f}", lr=f"{update.lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
        bar.update(1)
        if run.step % self.args.log_every == 0 or run.step == self.args.max_steps:
            self.metrics.append({"step": run.step, "loss": w.loss / w.updates, "lr": update.lr,
                                 "grad_norm": update.grad_norm, "tokens_per_s": tok_s})
            run.window = _Window()

    def _evaluate_and_save(self, run: _Run) -> None:
        """After update ``run.step``: evaluate every eval_every updates and at the end; the same for checkpoints."""
        a, step = self.args, run.step
        if self.eval_data is not None and ((a.eval_every and step % a.eval_every == 0) or step == a.max_steps):
            run.last_eval = evaluate(self.model, self.eval_data, a.eval_batch_size or a.batch_size)
            self.metrics.append({"step": step, **run.last_eval})
            run.eval_step = step
        if (a.save_every and step % a.save_every == 0) or step == a.max_steps:
            run.last_saved = save_checkpoint(a.output_dir, step, **self._parts(), keep=a.keep_checkpoints,
                                             extra={"args": dataclasses.asdict(a)})
            run.saved_step = step
            plot_loss(self.metrics.events, Path(a.output_dir) / "loss.png")

    def _summary(self, run: _Run) -> dict:
        a = self.args
        if self.eval_data is not None and run.eval_step != run.step:  # resumed at max_steps: nothing ran
            run.last_eval = evaluate(self.model, self.eval_data, a.eval_batch_size or a.batch_size)
        plot_loss(self.metrics.events, Path(a.output_dir) / "loss.png")
        return {"step": run.step, "steps_run": run.step - run.start_step,
                "train_loss": sum(run.recent) / len(run.recent) if run.recent else None,
                "eval_loss": run.last_eval["eval_loss"], "eval_ppl": run.last_eval["eval_ppl"],
                "checkpoint": str(run.last_saved) if run.saved_step is not None else None}

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad()
        if hasattr(self.model, "zero_grad"):
            self.model.zero_grad()  # parameters outside the groups may hold gradients too

    def _accumulate(self, step: int, last_saved) -> tuple[float, int]:
        """Forward + backward of grad_accum_steps micro-batches; (mean loss, real tokens)."""
        k, total, tokens = self.args.grad_accum_steps, 0.0, 0
        regularizer = self.hooks.regularizer
        for _ in range(k):
            batch = self.loader.next_batch()
            out = self.model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
            loss = out.loss
            if regularizer:
                extra = regularizer()
                if isinstance(extra, Tensor):
                    loss = loss + extra
            value = float(loss.item())
            if not math.isfinite(value):
                raise self._error(step, f"the training loss is {value}", last_saved)
            (loss * (1.0 / k)).backward()  # 1/K: the update follows the mean of the K losses
            total += value
            tokens += batch.num_tokens
        return total / k, tokens

    def _error(self, step: int, what: str, last_saved) -> TrainingError:
        kept = (f"the last good checkpoint, '{last_saved}', is kept" if last_saved is not None
                else "no checkpoint had been written yet")
        return TrainingError(f"step {step + 1}: {what}; training stopped before this update changed the "
                             f"weights, and {kept} (nothing is saved after a bad step). Lower the learning "
                             "rate or set max_grad_norm, then resume=True.")


# Settings that change what a resumed run computes (lr and clipping may be changed on purpose,
# e.g. after a NaN stop, and the schedule's shape is checked strictly by Schedule itself).
_SAME_ON_RESUME = ("batch_size", "grad_accum_steps", "weight_decay", "optimizer", "adam_betas", "adam_eps",
                   "momentum", "seed", "seq_len", "packing", "eval_fraction")


def _warn_changed_args(args: TrainingArguments, saved: dict, folder) -> None:
    now = dataclasses.asdict(args)
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in _SAME_ON_RESUME
               if k in saved and (list(now[k]) if isinstance(now[k], tuple) else now[k]) != saved[k]]
    if changed:
        warnings.warn(f"resuming '{folder}' with changed settings ({'; '.join(changed)}): the run will not "
                      "continue exactly as it would have", stacklevel=3)


def _progress_bar(args: TrainingArguments, *, total: int, initial: int = 0, desc: str, unit: str):
    """A tqdm bar on stderr, shown only when it is a terminal and ``args.progress`` is set."""
    from tqdm import tqdm  # noqa: PLC0415 - only the trainer needs it

    enabled = args.progress and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, file=sys.stderr, disable=not enabled,
                desc=desc, unit=unit, dynamic_ncols=True)


def _calibration_batches(data: Dataset, args: TrainingArguments):
    """The training data in file order, ``batch_size`` examples at a time, with a progress bar.

    A generator: the bar appears at the first batch taken (a model whose methods do not
    calibrate shows none) and closes when the generator is exhausted or closed."""
    bar = _progress_bar(args, total=-(-len(data) // args.batch_size), desc="calibrate", unit="batch")
    with bar:
        for batch in iter_batches(data, args.batch_size):
            yield batch
            bar.update(1)
