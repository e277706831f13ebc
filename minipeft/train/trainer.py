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
from pathlib import Path

import numpy as np

from ..autograd.tensor import Tensor, no_grad
from ..errors import CheckpointError, MiniPeftError
from ..nn.groups import ParameterGroup
from .arguments import TrainingArguments
from .batches import BatchLoader, iter_batches
from .checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from .data import Dataset, Example, load_datasets
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


def _hook(model, name):
    fn = getattr(model, name, None)
    return fn if callable(fn) else None


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
        if parameter_groups is None:
            get = _hook(model, "parameter_groups")
            parameter_groups = get() if get else [
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
        a, model, out = self.args, self.model, Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.optimizer = optimizer = self._optimizer()
        self.schedule = schedule = Schedule(a.schedule, a.warmup_steps, a.max_steps, restart_every=a.restart_every,
                                            restart_warmup_steps=a.restart_warmup_steps, min_lr_ratio=a.min_lr_ratio)
        self.loader = loader = BatchLoader(self.train_data, a.batch_size, np.random.default_rng(a.seed))
        metrics = MetricsLog(out / "metrics.jsonl")
        parts = dict(model=model, groups=self.groups, optimizer=optimizer, schedule=schedule, loader=loader)
        last_saved = find_latest_checkpoint(out)
        if resume:
            if last_saved is None:
                raise CheckpointError(f"resume=True, but '{out}' holds no checkpoint (step-N folder)")
            state = load_checkpoint(last_saved, **parts)
            step = state["step"]
            _warn_changed_args(a, state.get("extra", {}).get("args", {}), last_saved)
            metrics.resume(step)
        elif last_saved is not None:
            raise CheckpointError(f"'{out}' already holds checkpoints (latest: {last_saved.name}); pass "
                                  "resume=True to continue that run, or choose another output_dir")
        else:
            step = 0
            metrics.reset()
        start_step, saved_step, eval_step = step, (step if resume else None), None
        last = {"eval_loss": None, "eval_ppl": None}
        recent = deque(maxlen=a.log_every)  # per-update losses for the summary
        window = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
        bar = _progress_bar(a, step)
        model.train()
        try:
            while step < a.max_steps:
                t0 = time.perf_counter()
                loss, tokens = self._accumulate(step, last_saved)
                mask = _hook(model, "mask_gradients")
                if mask:
                    mask(step)
                norm = (clip_grad_norm(self.groups, a.max_grad_norm) if a.max_grad_norm is not None
                        else grad_norm(self.groups))
                if not math.isfinite(norm):
                    raise self._error(step, f"the gradient norm is {norm}", last_saved)
                optimizer.lr_scale = schedule(step)
                lr = a.lr * optimizer.lr_scale  # the base lr; groups may scale their own
                optimizer.step()
                end = _hook(model, "on_step_end")
                if end:
                    end(step)
                edit = _hook(model, "edit_optimizer_state")
                if edit:  # the optimizer is the trainer's: methods that prune its state (ReLoRA) get it here
                    edit(step, optimizer)
                self._zero_grad()
                schedule.advance()
                step += 1
                recent.append(loss)
                for key, value in (("loss", loss), ("n", 1), ("tokens", tokens), ("time", time.perf_counter() - t0)):
                    window[key] += value
                tok_s = window["tokens"] / max(window["time"], 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
                bar.update(1)
                if step % a.log_every == 0 or step == a.max_steps:
                    metrics.append({"step": step, "loss": window["loss"] / window["n"], "lr": lr,
                                    "grad_norm": norm, "tokens_per_s": tok_s})
                    window = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
                if self.eval_data is not None and ((a.eval_every and step % a.eval_every == 0)
                                                   or step == a.max_steps):
                    last = evaluate(model, self.eval_data, a.eval_batch_size or a.batch_size)
                    metrics.append({"step": step, **last})
                    eval_step = step
                if (a.save_every and step % a.save_every == 0) or step == a.max_steps:
                    last_saved = save_checkpoint(out, step, **parts, keep=a.keep_checkpoints,
                                                 extra={"args": dataclasses.asdict(a)})
                    saved_step = step
                    plot_loss(metrics.events, out / "loss.png")
        finally:
            bar.close()
            self._zero_grad()  # after an error too: a half-accumulated gradient is never useful
        if self.eval_data is not None and eval_step != step:  # resumed at max_steps: nothing ran
            last = evaluate(model, self.eval_data, a.eval_batch_size or a.batch_size)
        plot_loss(metrics.events, out / "loss.png")
        return {"step": step, "steps_run": step - start_step,
                "train_loss": sum(recent) / len(recent) if recent else None,
                "eval_loss": last["eval_loss"], "eval_ppl": last["eval_ppl"],
                "checkpoint": str(last_saved) if saved_step is not None else None}

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad()
        if hasattr(self.model, "zero_grad"):
            self.model.zero_grad()  # parameters outside the groups may hold gradients too

    def _accumulate(self, step: int, last_saved) -> tuple[float, int]:
        """Forward + backward of grad_accum_steps micro-batches; (mean loss, real tokens)."""
        k, total, tokens = self.args.grad_accum_steps, 0.0, 0
        regularizer = _hook(self.model, "regularizer")
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


def _progress_bar(args: TrainingArguments, step: int):
    from tqdm import tqdm  # noqa: PLC0415 - only the trainer needs it

    enabled = args.progress and sys.stderr.isatty()
    return tqdm(total=args.max_steps, initial=step, file=sys.stderr, disable=not enabled,
                desc="train", unit="step", dynamic_ncols=True)
