"""What a training run shows while it goes, and how Ctrl-C stops it.

Progress: on a terminal, a tqdm bar on stderr; when stderr is not a terminal (a log file,
CI, ``nohup``), one plain line every ``log_every`` updates instead, so that the log shows
the run is alive and how fast it goes::

    step 20/200: loss 2.3412, lr 1.00e-03, 5321 tok/s, 0:00:12 elapsed, 0:01:48 left

Ctrl-C: the first one, while the update loop runs, is deferred to the end of the update
in progress (an update half applied to the weights cannot be saved or resumed); the
trainer then saves a checkpoint at that step and raises :class:`TrainingInterrupted`
(a ``KeyboardInterrupt``). A second Ctrl-C stops at once. The handler is installed only
in the main thread and only over Python's default one, so an application's own handler
is left alone.
"""
from __future__ import annotations

import datetime
import signal
import sys
import threading
import time


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``checkpoint`` is the folder a resume continues (or None)."""

    def __init__(self, message: str, checkpoint=None, step: int | None = None):
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


class InterruptFlag:
    """A context that turns the first SIGINT into ``requested = True`` (see the module docstring)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> InterruptFlag:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: the user does not want to wait
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step to save a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def progress_bar(enabled: bool, *, total: int, initial: int = 0, desc: str, unit: str):
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal."""
    from tqdm import tqdm  # noqa: PLC0415 - only the trainer needs it

    return tqdm(total=total, initial=initial, file=sys.stderr, disable=not (enabled and sys.stderr.isatty()),
                desc=desc, unit=unit, dynamic_ncols=True)


class LogLines:
    """The plain progress lines for a stderr that is not a terminal (``enabled`` false: none)."""

    def __init__(self, enabled: bool, total: int, start_step: int):
        self.enabled = enabled and not sys.stderr.isatty()
        self.total, self.start_step, self.t0 = total, start_step, time.monotonic()

    def __call__(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.t0
        done = step - self.start_step
        left = elapsed / done * (self.total - step) if done else 0.0
        print(f"step {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:.0f} tok/s, "
              f"{_clock(elapsed)} elapsed, {_clock(left)} left", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
