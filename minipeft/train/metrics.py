"""Run records: ``metrics.jsonl`` (one JSON object per event) and the ``loss.png`` curve.

Events are ``{"step", "loss", "lr", "grad_norm", "tokens_per_s"}`` (a training log) or
``{"step", "eval_loss", "eval_ppl", "eval_tokens"}`` (an evaluation); ``step`` counts the
updates done. Each line is appended and flushed as it happens, so the file is readable
while the run goes on. On resume from step N the file is rewritten (atomically) to the
events with step <= N: the lines a crashed run wrote after its last checkpoint are
replaced by those of the resumed run, not duplicated.

The plot uses matplotlib's object API with the Agg canvas (no pyplot, no global backend
switch); without matplotlib (an install extra: ``pip install -e ".[plots]"``) it is skipped
and minipeft/plots.py says so once.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import CheckpointError
from ..io.safetensors import atomic_write
from ..plots import matplotlib_missing


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    def __init__(self, path):
        self.path = Path(path)
        self.events: list[dict] = []

    def reset(self) -> None:
        """Start a fresh run: an empty file."""
        self.events = []
        atomic_write(self.path, lambda f: None)

    def resume(self, step: int) -> None:
        """Keep the events up to ``step`` (the checkpoint resumed from)."""
        self.events = []
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # a line torn by the crash that stopped the run
                        break
                    raise CheckpointError(f"'{self.path}', line {number}: not valid JSON") from None
                if isinstance(event, dict) and isinstance(event.get("step"), int) and event["step"] <= step:
                    self.events.append(event)
        data = "".join(json.dumps(e) + "\n" for e in self.events).encode("utf-8")
        atomic_write(self.path, lambda f: f.write(data))

    def append(self, event: dict) -> None:
        event = {k: _clean(v) for k, v in event.items()}
        self.events.append(event)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")


def plot_loss(events: list[dict], path) -> bool:
    """Draw train (and eval) loss against step into ``path``; False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        return matplotlib_missing()  # said once per process
    train = [(e["step"], e["loss"]) for e in events if e.get("loss") is not None]
    evals = [(e["step"], e["eval_loss"]) for e in events if e.get("eval_loss") is not None]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return True
