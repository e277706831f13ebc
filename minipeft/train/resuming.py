"""What resuming a run checks and says: settings that changed, and a schedule asked anew.

A checkpoint saves the schedule it ran (kind, warmup, total steps, position). A resume that
asks for another one (a larger ``max_steps`` to extend a finished run, another warmup or
schedule) is allowed: the checkpoint's position is restored, the run follows the schedule
asked for now, and :func:`schedule_change` says in one line what changed and what the
learning rate does at that step. Other settings that change what the resumed run computes
are named by :func:`warn_changed_args`.
"""
from __future__ import annotations

import dataclasses
import warnings

from .arguments import TrainingArguments
from .schedules import Schedule


# Settings that change what a resumed run computes (lr and clipping may be changed on purpose,
# e.g. after a NaN stop; a schedule asked anew is said by schedule_change).
_SAME_ON_RESUME = ("batch_size", "grad_accum_steps", "weight_decay", "optimizer", "adam_betas", "adam_eps",
                   "momentum", "seed", "seq_len", "packing", "eval_fraction")


def warn_changed_args(args: TrainingArguments, saved: dict, folder) -> None:
    now = dataclasses.asdict(args)
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in _SAME_ON_RESUME
               if k in saved and (list(now[k]) if isinstance(now[k], tuple) else now[k]) != saved[k]]
    if changed:
        warnings.warn(f"resuming '{folder}' with changed settings ({'; '.join(changed)}): the run will not "
                      "continue exactly as it would have", stacklevel=5)


def saved_schedule(state: dict, folder) -> Schedule | None:
    """The schedule a checkpoint was saved with (None when its state is not readable: load_checkpoint
    then names what is wrong)."""
    saved = state.get("schedule")
    if not isinstance(saved, dict):
        return None
    try:
        return Schedule(saved["kind"], saved["warmup_steps"], saved["total_steps"], step=saved["step"],
                        **{k: saved[k] for k in ("restart_every", "restart_warmup_steps", "min_lr_ratio")
                           if k in saved})
    except (KeyError, TypeError, ValueError):
        return None


def schedule_change(old: Schedule, new: Schedule, folder) -> str:
    """One line: how the schedule of a resumed run differs from the checkpoint's."""
    jagged = "jagged_cosine" in (old.kind, new.kind)
    changes = [f"{name}={getattr(old, attr)!r} -> {getattr(new, attr)!r}"
               for name, attr in (("max_steps", "total_steps"), ("warmup_steps", "warmup_steps"),
                                  ("schedule", "kind"), ("restart_every", "restart_every"),
                                  ("restart_warmup_steps", "restart_warmup_steps"), ("min_lr_ratio", "min_lr_ratio"))
               if getattr(old, attr) != getattr(new, attr) and (jagged or attr in ("total_steps", "warmup_steps",
                                                                                    "kind"))]
    return (f"resuming '{folder}' at step {old.step} with a new schedule ({', '.join(changes)}): the learning "
            f"rate multiplier there goes from {old():.3g} to {new():.3g}, and the run now ends at step "
            f"{new.total_steps}")
