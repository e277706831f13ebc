"""The PEFT methods side by side, measured: the chapter's comparison table and its two plots.

Every method trains on the same data, for the same steps, with the same seed, batch size and
schedule, one at a time in a fresh model (``load_model()``), through the same :class:`Trainer`
(so a selective method's calibration pass runs as it does in ``minipeft train``). Only the
learning rate is the method's own (:data:`DEFAULT_LR`: rates that work on the bundled model).
For each method :func:`run_method` measures:

* trainable parameters, and their share of the base model's parameters (tied weights once; a
  method's trainable count may exceed it: a dense weight difference for several weights);
* peak memory: the peak of ``tracemalloc``'s traced memory (NumPy reports its array buffers to
  it, Python objects are traced too) from building the adapted model to the end of training,
  calibration, evaluations and checkpoints included. Host memory only: CuPy's device memory is
  not traced. Tracing slows allocation, so every method runs (and is timed) under it alike;
* s / step: the mean wall time of an optimizer update (forward, backward, hooks, optimizer),
  without the calibration pass, evaluations and checkpoints (under tracemalloc, see above);
* eval loss (token-weighted mean cross-entropy on the eval set) and perplexity exp(loss) after
  the last step, and the eval loss curve (before training, then every ``eval_every`` steps);
* extra inference cost: the best-of-``repeats`` forward time of the trained, unmerged model on the
  first eval batch ÷ that of the bare base model, − 1 (timed alternately, so drift hits both).
  A mergeable method costs nothing once merged (``merge_and_unload`` returns the bare
  architecture), so its cost is "0 merged"; a method that cannot merge always pays it.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import math
import shutil
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..autograd.tensor import no_grad
from ..errors import MiniPeftError
from ..plots import matplotlib_missing
from .arguments import TrainingArguments
from .batches import iter_batches
from .data import Dataset
from .trainer import Trainer, evaluate

# minipeft train's --method name -> learning rate that works on the bundled stories260K (examples/additive_zoe.py):
# vectors and prompts need larger rates than matrices; full fine-tuning and the selective methods, which move
# the pretrained weights themselves, smaller ones. prefix: for its CLI default, the plain N(0, 1) table (60 steps on
# the Zoe stories: eval loss 3.80 at 1e-2, 2.88 at 0.1); with --prefix-projection give --lr prefix=3e-3.
DEFAULT_LR = {
    "lora": 3e-3, "dora": 3e-3, "adalora": 3e-3, "dylora": 3e-3, "relora": 3e-3, "lokr": 3e-3,
    "prompt": 0.3, "prefix": 0.1, "ia3": 3e-2, "houlsby": 3e-3, "pfeiffer": 3e-3, "fusion": 3e-3,
    "bitfit": 1e-2, "child-f": 1e-3, "child-d": 1e-3, "fishmask": 1e-3, "full": 1e-3,
}
FALLBACK_LR = 2e-3  # minipeft train's --lr default, for a method the table does not know
FAMILIES = {"lowrank": "low-rank", "additive": "additive", "selective": "selective"}  # peft/<folder>/


def family(method) -> str:
    """low-rank / additive / selective (the method's folder in minipeft/peft/), or full."""
    if method.peft_type == "FULL":
        return "full"
    parts = method.config_cls.__module__.split(".")
    folder = parts[parts.index("peft") + 1] if "peft" in parts[:-1] else "other"
    return FAMILIES.get(folder, folder)


@dataclass(frozen=True)
class Candidate:
    """One method to run: its ``minipeft train --method`` name, table row, config and learning rate."""

    name: str
    method: object  # PeftMethod
    config: object  # its config
    lr: float


@dataclass(frozen=True)
class CompareSettings:
    """What every method shares."""

    steps: int = 60
    batch_size: int = 8
    seq_len: int = 256
    warmup_steps: int = 10
    schedule: str = "cosine"
    seed: int = 0
    eval_every: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    repeats: int = 20  # forward timings per model for the inference cost (best of)
    progress: bool = True


@dataclass
class Result:
    name: str
    family: str
    lr: float
    trainable: int
    base_params: int  # of the bare base model (tied weights once)
    peak_bytes: int
    seconds_per_step: float
    train_seconds: float  # the whole Trainer.train(): calibration, evals and checkpoints included
    eval_loss: float
    perplexity: float
    unmerged_overhead: float  # forward time unmerged ÷ bare model − 1
    mergeable: bool
    curve: list = field(default_factory=list)  # [(step, eval loss)], step 0 = before training

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base_params

    def inference_cost(self) -> str:
        overhead = self.unmerged_overhead if abs(self.unmerged_overhead) >= 0.005 else 0.0  # no "-0%"
        unmerged = f"{overhead:+.0%} unmerged"
        return f"0 merged ({unmerged})" if self.mergeable else f"n/a (cannot merge); {unmerged}"


class _TimedTrainer(Trainer):
    """The Trainer, also summing the wall time of its optimizer updates (what s / step reports)."""

    update_seconds = 0.0

    def _step(self, step, last_saved):
        update = super()._step(step, last_saved)
        self.update_seconds += update.seconds
        return update


def forward_seconds(models: list, batch, repeats: int) -> list[float]:
    """Best-of-``repeats`` no-grad forward time of each model on ``batch``, the models timed in turn."""
    best = [math.inf] * len(models)
    for model in models:
        model.eval()
    with no_grad():
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(batch.input_ids, attention_mask=batch.attention_mask)
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def run_method(candidate: Candidate, load_model: Callable, train: Dataset, evals: Dataset,
               settings: CompareSettings, folder: Path, base_model) -> Result:
    """Train ``candidate`` in a fresh model into ``folder`` (replaced) and measure it (module docstring)."""
    from ..peft import get_peft_model  # noqa: PLC0415 - peft builds on train's siblings, not on train

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)  # compare's own run folder: a rerun replaces it
    gc.collect()
    tracemalloc.start()
    try:
        model = get_peft_model(load_model(), candidate.config, seed=settings.seed)
        trainable = model.get_nb_trainable_parameters()[0]
        curve = [(0, evaluate(model, evals, settings.batch_size)["eval_loss"])]
        args = TrainingArguments(
            output_dir=str(folder), max_steps=settings.steps, batch_size=settings.batch_size, lr=candidate.lr,
            weight_decay=settings.weight_decay, warmup_steps=settings.warmup_steps, schedule=settings.schedule,
            max_grad_norm=settings.max_grad_norm, seed=settings.seed, eval_every=settings.eval_every,
            seq_len=settings.seq_len, progress=settings.progress)
        trainer = _TimedTrainer(model, args, train, evals)
        start = time.perf_counter()
        summary = trainer.train()
        train_seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    model.save_pretrained(folder)  # the trained adapter, as minipeft train leaves it
    curve += [(e["step"], e["eval_loss"]) for e in trainer.metrics.events if e.get("eval_loss") is not None]
    batch = next(iter_batches(evals, settings.batch_size))
    adapted, bare = forward_seconds([model, base_model], batch, settings.repeats)
    base_params = sum(int(p.size) for p in base_model.parameters())
    return Result(candidate.name, family(candidate.method), candidate.lr, trainable, base_params, peak,
                  trainer.update_seconds / settings.steps, train_seconds, summary["eval_loss"], summary["eval_ppl"],
                  adapted / bare - 1.0, candidate.method.mergeable, curve)


def compare(candidates: list[Candidate], load_model: Callable, train: Dataset, evals: Dataset,
            settings: CompareSettings, out, on_result: Callable | None = None,
            on_failure: Callable | None = None) -> list[Result]:
    """:func:`run_method` for each candidate, in order, into ``out/<name>``; ``on_result(result)`` after each.

    With ``on_failure(name, error)``, a method that stops with a minipeft error (a NaN loss at its
    learning rate ...) is reported there and left out, and the others still run; without it, it raises.
    """
    base_model = load_model()
    if candidates:  # one untraced step first: code paths run for the first time (imports) are not a method's memory
        with tempfile.TemporaryDirectory() as scratch, contextlib.suppress(MiniPeftError):  # (reported below)
            run_method(candidates[0], load_model, train, evals, dataclasses.replace(
                settings, steps=1, warmup_steps=0, eval_every=0, repeats=1, progress=False), scratch, base_model)
    results = []
    for candidate in candidates:
        try:
            result = run_method(candidate, load_model, train, evals, settings, Path(out) / candidate.name,
                                base_model)
        except MiniPeftError as error:
            if on_failure is None:
                raise
            on_failure(candidate.name, error)
            continue
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


# ----- the table and the plots -------------------------------------------------------------
HEADER = ("method", "family", "lr", "trainable params", "% of the base model", "peak memory (tracemalloc, MB)",
          "s / step", "eval loss", "perplexity", "extra inference cost (forward time vs the bare model)",
          "mergeable")


def table_rows(results: list[Result]) -> list[tuple[str, ...]]:
    return [(r.name, r.family, f"{r.lr:g}", f"{r.trainable:,d}", f"{r.percent:.3g}%", f"{r.peak_bytes / 2**20:.1f}",
             f"{r.seconds_per_step:.3f}", f"{r.eval_loss:.4f}", f"{r.perplexity:.2f}", r.inference_cost(),
             "yes" if r.mergeable else "no") for r in results]


def markdown_table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines) + "\n"


def write_table(results: list[Result], out, preamble: str = "") -> str:
    """Write ``comparison.md`` (``preamble`` + the table) and ``comparison.csv`` (raw numbers); the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out / "comparison.md").write_text(preamble + table, encoding="utf-8")
    skip = {"curve"}
    names = [f.name for f in dataclasses.fields(Result) if f.name not in skip]
    with open(out / "comparison.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(names + ["percent", "peak_mb", "inference_cost"])
        for r in results:
            writer.writerow([getattr(r, n) for n in names] + [r.percent, r.peak_bytes / 2**20, r.inference_cost()])
    return table


FAMILY_COLOURS = {"low-rank": "tab:blue", "additive": "tab:orange", "selective": "tab:green", "full": "tab:red"}


def plot(results: list[Result], out) -> bool:
    """``loss_vs_steps.png`` and ``loss_vs_params.png`` in ``out``; False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        return matplotlib_missing()  # said once per process
    out = Path(out)
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive",
                                    "cyan")] + ["black", "gold", "navy", "lime", "teal", "maroon"]
    styles = {"low-rank": "-", "additive": "--", "selective": ":", "full": "-."}  # the line style names the family
    for i, r in enumerate(results):
        ax.plot(*zip(*r.curve), styles.get(r.family, "-"), marker="o", markersize=3, label=f"{r.name} ({r.family})",
                color=colours[i % len(colours)])
    ax.set(xlabel="step", ylabel="eval loss (nats / token)", title="eval loss during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.savefig(out / "loss_vs_steps.png")

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for fam in dict.fromkeys(r.family for r in results):
        rows = [r for r in results if r.family == fam]
        ax.scatter([r.trainable for r in rows], [r.eval_loss for r in rows], label=fam,
                   color=FAMILY_COLOURS.get(fam))
    for r in results:
        ax.annotate(r.name, (r.trainable, r.eval_loss), fontsize="small", xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log scale)", ylabel="eval loss after training",
           title="eval loss against trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out / "loss_vs_params.png")
    return True
