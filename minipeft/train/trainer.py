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
``metrics.jsonl``, ``checkpoint-N`` folders and error messages count updates done (1-based),
so the update that hook step s belongs to is reported as step s + 1.

Evaluation reports the token-weighted mean loss  L = Σ_b n_b·CE_b / Σ_b n_b  (n_b target
tokens of batch b) and perplexity exp(L).

Nothing lost:
* A non-finite loss or gradient norm stops the run with :class:`TrainingError` before the
  weights change, in one line that names the checkpoint kept and the learning rate to
  resume with (NumPy's overflow warnings, which would precede it, are silenced during
  the updates: the stop says what they would).
* A checkpoint is written only when the trainable weights are finite and below
  ``SANE_LIMIT`` in magnitude; weights that diverged stop the run in the same way, so the
  checkpoint a resume continues is never one that already holds 1e37s.
* Ctrl-C (progress.py) saves a checkpoint at the step reached and raises
  :class:`~.progress.TrainingInterrupted`; a resume continues bit for bit. A
  ``KeyboardInterrupt`` raised before an update touched the weights (from the forward or a
  hook that runs before the optimizer step) rolls the data cursor and the dropout generator
  back to the start of that update and saves too; one raised while the weights were being
  updated saves nothing (the last checkpoint stays the one to resume).

Resuming a checkpoint with another ``max_steps`` (or another warmup or schedule) continues
it with the schedule asked for now, and says in one warning what changed: a finished run
is extended with ``max_steps`` = the new total.

Memory: ``train()`` first asks glibc to keep freed memory for the next step (minipeft/allocator.py).
Threads: ``train()`` runs with ``args.threads`` BLAS threads (minipeft/threads.py chooses
when it is None).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..autograd.tensor import Tensor
from ..backend import get_array_module
from ..errors import CheckpointError, MiniPeftError
from ..io.checkpoint import read_json
from ..nn.groups import ParameterGroup
from ..allocator import keep_freed_memory
from ..threads import num_threads
from .arguments import TrainingArguments
from .batches import BatchLoader, iter_batches
from .checkpoint import find_latest_checkpoint, load_checkpoint, prepare_output_dir, save_checkpoint
from .data import Dataset, Example, load_datasets
from .hooks import TrainingHooks
from .metrics import MetricsLog, plot_loss
from .optim import SGD, AdamW, clip_grad_norm, grad_norm
from .evaluation import evaluate
from .progress import InterruptFlag, LogLines, TrainingInterrupted, progress_bar
from .resuming import saved_schedule, schedule_change, warn_changed_args
from .schedules import Schedule

# Trainable weights beyond this magnitude have diverged (real LLaMA weights stay within
# ~1e3; float32 overflows at 3.4e38): no checkpoint is written with them.
SANE_LIMIT = 1e6


class TrainingError(MiniPeftError, RuntimeError):
    """Training cannot go on (a NaN/inf loss or gradient); the message names the step."""


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
        keep_freed_memory()  # a step's large temporaries reuse the last step's pages (minipeft/allocator.py)
        with num_threads(self.args.threads):
            return self._train(resume)

    def _train(self, resume: bool) -> dict:
        a = self.args
        prepare_output_dir(a.output_dir)
        self.optimizer = self._optimizer()
        self.schedule = Schedule(a.schedule, a.num_warmup_steps, a.max_steps, restart_every=a.restart_every,
                                 restart_warmup_steps=a.restart_warmup_steps, min_lr_ratio=a.min_lr_ratio)
        self.loader = BatchLoader(self.train_data, a.batch_size, np.random.default_rng(a.seed))
        self.metrics = MetricsLog(Path(a.output_dir) / "metrics.jsonl")
        run = self._resume() if resume else self._start()
        if a.num_warmup_steps > a.max_steps and run.step < a.max_steps:
            warnings.warn(f"warmup_steps={a.num_warmup_steps} is longer than the run (max_steps={a.max_steps}): "
                          "the learning rate never reaches its peak", stacklevel=3)
        self.model.train()
        if not resume:
            self._calibrate()
        bar = progress_bar(a.progress, total=a.max_steps, initial=run.step, desc="train", unit="step")
        self._lines = LogLines(a.progress, a.max_steps, run.step)
        # overflow in a diverging update is reported by the NaN stop, in one line, not as NumPy warnings
        position, self._committed = None, False
        with InterruptFlag() as interrupt, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                while run.step < a.max_steps:
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    position = self._position(run.step)
                    self._committed = False  # set by _step when the weights start to change
                    update = self._step(run.step, run.last_saved)
                    run.step += 1
                    self._committed = False
                    self._log(run, update, bar)
                    self._evaluate_and_save(run)
                if interrupt.requested:  # asked during the last update: it is saved already
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise self._interrupted(run, position) from None
            finally:
                bar.close()
                self._zero_grad()  # after an error too: a half-accumulated gradient is never useful
        return self._summary(run)

    def _position(self, step: int) -> tuple:
        """Where update ``step`` draws from: the data cursor and the dropout generator (and the step)."""
        rng = self.hooks.rng
        return self.loader.state_dict(), (rng.bit_generator.state if rng is not None else None), step

    def _interrupted(self, run: _Run, position) -> TrainingInterrupted:
        """Ctrl-C: save at the step reached when the weights are consistent; the exception to raise."""
        if self._committed:  # the weights hold part of an update: not a state to save
            kept = f"'{run.last_saved}' is kept" if run.last_saved is not None else "no checkpoint was written"
            return TrainingInterrupted(f"interrupted during update {run.step + 1}, while the weights were being "
                                       f"changed: nothing saved, {kept}", run.last_saved, run.saved_step)
        if run.saved_step != run.step and run.step > run.start_step:
            if position is not None and run.step == position[2]:  # stopped inside an update: undo its draws
                self.loader.load_state_dict(position[0])
                if position[1] is not None:
                    self.hooks.rng.bit_generator.state = position[1]
            self._zero_grad()
            self._save(run)
        elif run.saved_step != run.step:  # nothing done yet in this call
            return TrainingInterrupted(f"interrupted at step {run.step}, before any update: nothing to save",
                                       run.last_saved, run.saved_step)
        return TrainingInterrupted(f"interrupted at step {run.step}: '{run.last_saved}' holds it; resume=True "
                                   "continues from there", run.last_saved, run.step)

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
            raise CheckpointError(f"resume=True, but '{out}' holds no checkpoint (checkpoint-N folder)")
        saved = read_json(last_saved / "trainer_state.json", "trainer state")
        parts = self._parts()
        old_schedule = saved_schedule(saved, last_saved)
        if old_schedule is not None and old_schedule.state_dict() != {**self.schedule.state_dict(),
                                                                      "step": old_schedule.step}:
            if old_schedule.step > self.args.max_steps:
                raise CheckpointError(f"max_steps={self.args.max_steps} is below the {old_schedule.step} steps "
                                      f"'{last_saved}' has done; ask for at least {old_schedule.step}")
            parts["schedule"] = old_schedule  # restored as saved; this run then follows the schedule asked for
        state = load_checkpoint(last_saved, **parts)
        step = state["step"]
        if parts["schedule"] is not self.schedule:
            self.schedule.step = parts["schedule"].step
            warnings.warn(schedule_change(parts["schedule"], self.schedule, last_saved), stacklevel=4)
        warn_changed_args(self.args, state.get("extra", {}).get("args", {}), last_saved)
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
        self._committed = True  # from here on the weights change: an interrupt cannot save this state
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
            self._lines(run.step, w.loss / w.updates, update.lr, tok_s)  # when stderr is not a terminal
            run.window = _Window()

    def _evaluate_and_save(self, run: _Run) -> None:
        """After update ``run.step``: evaluate every eval_every updates and at the end; the same for checkpoints."""
        a, step = self.args, run.step
        if self.eval_data is not None and ((a.eval_every and step % a.eval_every == 0) or step == a.max_steps):
            run.last_eval = evaluate(self.model, self.eval_data, a.eval_batch_size or a.batch_size)
            self.metrics.append({"step": step, **run.last_eval})
            run.eval_step = step
        if (a.save_every and step % a.save_every == 0) or step == a.max_steps:
            self._save(run)

    def _save(self, run: _Run) -> None:
        """A checkpoint at ``run.step``, when the trainable weights are sane (else a TrainingError)."""
        a = self.args
        insane = self._insane_weights()
        if insane is not None:
            raise self._error(run.step - 1, insane, run.last_saved, weights_changed=True)
        run.last_saved = save_checkpoint(a.output_dir, run.step, **self._parts(), keep=a.keep_checkpoints,
                                         extra={"args": dataclasses.asdict(a)})
        run.saved_step = run.step
        plot_loss(self.metrics.events, Path(a.output_dir) / "loss.png")

    def _insane_weights(self) -> str | None:
        """What is wrong with the trainable weights (non-finite, or beyond SANE_LIMIT); None if nothing."""
        worst = 0.0
        for g in self.groups:
            for p in g.params:
                xp = get_array_module(p.data)
                if p.data.size:
                    if not bool(xp.isfinite(p.data).all()):
                        return "the trainable weights hold NaN or inf values"
                    worst = max(worst, float(xp.abs(p.data).max()))
        return f"the trainable weights have diverged (values up to {worst:.3g})" if worst > SANE_LIMIT else None

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

    def _error(self, step: int, what: str, last_saved, weights_changed: bool = False) -> TrainingError:
        """The one-line stop on a non-finite loss or gradient, or on diverged weights (``step`` 0-based)."""
        stopped = "nothing saved" if weights_changed else "stopped before this update changed the weights"
        lower = f"{self.args.lr / 10:g}"
        if last_saved is not None:
            advice = (f"'{last_saved}' (finite weights) is kept: continue it with a lower learning rate, "
                      f"resume=True with lr={lower}")
        else:
            advice = f"no checkpoint had been written yet: start again with a lower learning rate, lr={lower}"
        return TrainingError(f"step {step + 1}: {what}; {stopped}; {advice}")


def _calibration_batches(data: Dataset, args: TrainingArguments):
    """The training data in file order, ``batch_size`` examples at a time, with a progress bar.

    A generator: the bar appears at the first batch taken (a model whose methods do not
    calibrate shows none) and closes when the generator is exhausted or closed."""
    bar = progress_bar(args.progress, total=-(-len(data) // args.batch_size), desc="calibrate", unit="batch")
    with bar:
        for batch in iter_batches(data, args.batch_size):
            yield batch
            bar.update(1)
