"""Fine-tuning: optimizers, LR schedules, JSONL data, checkpoints and the training loop.

    from minipeft.train import Trainer, TrainingArguments, load_datasets
    train, evals = load_datasets("train.jsonl", tokenizer, seq_len=256, eval_fraction=0.1)
    summary = Trainer(model, TrainingArguments("runs/demo", max_steps=200), train, evals).train()

The trainer works on any Module whose ``model(ids, attention_mask=, labels=)`` returns an
object with ``.loss``. Everything else is optional: the hooks a PEFT model has, listed (with
their signatures and when they are called) by :class:`TrainingHooks` (hooks.py) and looked
up once by ``TrainingHooks.of(model)``: ``parameter_groups()``, ``regularizer()``,
``mask_gradients(step)``, ``calibrate(batches)`` (fresh runs only), ``on_step_end(step)``,
``edit_optimizer_state(step, optimizer)``, ``save_pretrained(dir)``,
``load_method_state(dir)`` (on resume) and the dropout generator ``rng``.
"""
from .batches import Batch, BatchLoader, collate, iter_batches
from .hooks import TrainingHooks
from .checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .data import (ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, Dataset, Example, Record, build_dataset,
                   load_datasets, pack, read_jsonl, split_records, tokenize)
from .optim import SGD, AdamW, Optimizer, clip_grad_norm, grad_norm
from .schedules import SCHEDULES, Schedule, constant, cosine, jagged_cosine, linear
from .arguments import TrainingArguments
from .progress import TrainingInterrupted
from .trainer import Trainer, TrainingError, evaluate

__all__ = [
    "ALPACA_TEMPLATE", "ALPACA_TEMPLATE_NO_INPUT", "AdamW", "Batch", "BatchLoader", "Dataset", "Example",
    "Optimizer", "Record", "SCHEDULES", "SGD", "Schedule", "Trainer", "TrainingArguments", "TrainingError",
    "TrainingHooks", "TrainingInterrupted", "build_dataset", "clip_grad_norm", "collate", "constant", "cosine",
    "evaluate",
    "find_latest_checkpoint", "grad_norm", "iter_batches", "jagged_cosine", "linear", "list_checkpoints",
    "load_checkpoint", "load_datasets", "pack", "read_jsonl", "save_checkpoint", "split_records", "tokenize",
]
