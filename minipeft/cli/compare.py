"""``minipeft compare``: train several PEFT methods on the same data and measure them side by side.

    minipeft compare --data stories.jsonl --methods lora,ia3,prompt,full --steps 60 --out runs/compare

Each method (a ``minipeft train --method`` name, built from the same options and defaults as
there) trains in a fresh model with the same data, steps, batch size, schedule and seed; only
the learning rate is its own (minipeft/train/compare.py's table, or ``--lr NAME=RATE``). The
measuring is minipeft/train/compare.py's (what each column means is its docstring). ``--out``
receives ``comparison.md`` and ``comparison.csv`` (the table is printed too),
``loss_vs_steps.png`` and ``loss_vs_params.png`` (with matplotlib), and each method's run
folder ``OUT/<method>`` (checkpoints, metrics, the trained adapter), replaced by a rerun.
"""
from __future__ import annotations

import argparse
import math
import time
from functools import partial
from pathlib import Path

from ..errors import ConfigError
from ..io.tokenizer import Tokenizer
from ..models import LlamaForCausalLM
from ..train import compare as measure
from ..train import evaluate, load_datasets
from .common import add_model_option, model_folder, say
from . import train as train_cli
from .train import add_method_options, method_choices


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="train several PEFT methods on the same data and compare them",
                       description=__doc__.splitlines()[0])
    add_model_option(p)
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="training records (as minipeft train)")
    p.add_argument("--eval-data", metavar="FILE.jsonl", default=None, help="held-out records (else --eval-fraction)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out (default 0.1)")
    p.add_argument("--methods", default=None, metavar="A,B,...",
                   help=f"comma-separated, from: {', '.join(method_choices())} (default: every one that needs no "
                        "further input)")
    p.add_argument("--out", default="runs/compare", metavar="DIR", help="where the table, plots and runs go")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=RATE", dest="lr_overrides",
                   help="a method's learning rate instead of the table's (repeatable); a bare RATE sets every one")
    t = p.add_argument_group("training (the same for every method)")
    t.add_argument("--steps", type=int, default=60)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine")
    t.add_argument("--warmup", type=int, default=10, help="warmup steps (at most --steps; default 10)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--eval-every", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--timing-repeats", type=int, default=20, help="forward timings per model, best of (default 20)")
    add_method_options(p)
    p.set_defaults(run=run)


def learning_rates(entries: list[str], names: list[str]) -> dict:
    """``--lr`` entries over the table's rates: ``NAME=RATE`` for one method, ``RATE`` for all."""
    rates = {n: measure.DEFAULT_LR.get(n, measure.FALLBACK_LR) for n in names}
    for entry in entries:
        name, _, value = entry.rpartition("=")
        try:
            rate = float(value)
        except ValueError:
            raise ConfigError(f"--lr {entry!r}: expected NAME=RATE or RATE, e.g. lora=3e-3") from None
        if not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(f"--lr {entry!r}: the rate must be a positive number")
        if name and name not in names:
            raise ConfigError(f"--lr {entry!r}: {name!r} is not among --methods ({', '.join(names)})")
        rates.update({name: rate} if name else dict.fromkeys(names, rate))
    return rates


def train_arguments(args, name: str, lr: float) -> argparse.Namespace:
    """What ``minipeft train --method NAME`` would see: its defaults, then this command's values (the
    method options, --steps, --model ...); a method's config builder reads them (AdaLoRA: --steps)."""
    parser = argparse.ArgumentParser(add_help=False)
    train_cli.add_parser(parser.add_subparsers())
    namespace = parser.parse_args(["train", "--data", str(args.data), "--out", str(Path(args.out) / name),
                                   "--method", name])
    for key, value in vars(args).items():
        if key in vars(namespace) and key not in ("run", "method", "out", "lr"):
            setattr(namespace, key, value)
    namespace.lr = lr
    return namespace


def candidates(args) -> list[measure.Candidate]:
    """The methods to run, each with its config built as ``minipeft train --method NAME`` builds it."""
    choices = method_choices()
    asked = args.methods is not None
    names = [n.strip() for n in args.methods.split(",") if n.strip()] if asked else list(choices)
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown {unknown or 'none given'}; choose from {', '.join(choices)}")
    rates = learning_rates(args.lr_overrides, names)
    out = []
    for name in dict.fromkeys(names):
        method, build = choices[name]
        try:
            config = build(train_arguments(args, name, rates[name]))
        except ConfigError as error:
            if asked:
                raise
            say(f"skipping {name}: {error}")  # e.g. fusion, which needs trained adapters to fuse
            continue
        out.append(measure.Candidate(name, method, config, rates[name]))
    return out


def run(args) -> int:
    folder = model_folder(args)
    chosen = candidates(args)
    tokenizer = Tokenizer.from_pretrained(folder)
    eval_fraction = 0.0 if args.eval_data else args.eval_fraction
    train, evals = load_datasets(args.data, tokenizer, args.seq_len, eval_path=args.eval_data,
                                 eval_fraction=eval_fraction, seed=args.seed)
    if evals is None:
        raise ConfigError("compare needs eval data: give --eval-data or an --eval-fraction above 0")
    settings = measure.CompareSettings(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=min(args.warmup, args.steps),
        schedule=args.schedule, seed=args.seed, eval_every=args.eval_every, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, repeats=args.timing_repeats)
    load = partial(LlamaForCausalLM.from_pretrained, folder, device=args.device)
    base_loss = evaluate(load(), evals, args.batch_size)["eval_loss"]
    say(f"compare: {len(chosen)} methods x {args.steps} steps on {len(train)} examples "
        f"(eval: {len(evals)}; base model eval loss {base_loss:.4f})")
    start, done = time.perf_counter(), [0]

    def report(result):
        done[0] += 1
        say(f"[{done[0]}/{len(chosen)}] {result.name}: eval loss {result.eval_loss:.4f}, "
            f"{result.seconds_per_step:.3f} s/step, {time.perf_counter() - start:.0f} s so far")

    failed = []

    def failure(name, error):
        failed.append(f"{name} ({_one_line(error)})")
        say(f"{name} failed, left out of the table: {_one_line(error)}")

    results = measure.compare(chosen, load, train, evals, settings, args.out, on_result=report, on_failure=failure)
    preamble = (f"{len(results)} methods, {args.steps} steps each on {args.data} ({len(train)} train / "
                f"{len(evals)} eval examples), batch {args.batch_size}, {args.schedule} schedule, seed "
                f"{args.seed}; base model eval loss {base_loss:.4f}. Peak memory: tracemalloc's peak from "
                "building the adapted model to the end of training (host memory; every method runs under "
                "it). Extra inference cost: best-of forward time of the unmerged trained model / the bare "
                "model - 1 (0 once merged, for methods that merge).\n\n"
                + (f"Failed, not in the table: {'; '.join(failed)}.\n\n" if failed else ""))
    print(measure.write_table(results, args.out, preamble), end="")
    if not measure.plot(results, args.out):
        say("matplotlib is not installed: no plots (pip install matplotlib)")
    say(f"compare: {time.perf_counter() - start:.0f} s; table, csv and plots in {args.out}")
    return 0



def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
