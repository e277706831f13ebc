"""The speed table in one command: minipeft next to PyTorch (+ PEFT / transformers), row by row,
each with its goal.

    python examples/benchmarks/run_all.py [--smollm FOLDER] [--repeats 5] [--rounds 3] [--json rows.jsonl]

Rows (the workloads of the CPU-performance goals):

- a LoRA training step (r=8 on all seven projections, forward + backward + AdamW): the bundled
  stories260K and the stories15M shape at batch 8 × 256, 1 and 2 threads; SmolLM2-135M at
  batch 4 × 128, 1 thread (bench_lora_step.py: one process per framework and configuration,
  the median of ``--repeats`` steps after a warm-up); its peak RSS;
- a forward without gradients: the bundled model at batch 8 × 256, SmolLM2-135M on a 22-token
  prompt; greedy decoding of 64 tokens at batch 1 with the KV cache, SmolLM2-135M (goal: twice
  PyTorch's tokens/s) (bench_inference.py: one process per framework, medians of ``--repeats``
  after a warm-up; 1 thread);
- loading SmolLM2-135M from a float32 safetensors folder, and load + 32 greedy tokens' peak RSS
  (bench_load.py: a fresh process per measurement, frameworks alternating, medians).

The SmolLM2 rows need ``--smollm FOLDER`` (a float32 Hugging Face folder, e.g. written by
``mp.LlamaForCausalLM.from_pretrained("model.gguf").save_pretrained(FOLDER)`` plus its
tokenizer files); without it they are skipped with a message: a benchmark never downloads.

Prints a Markdown table (ratio = minipeft ÷ PyTorch, < 1 is faster or smaller; "met" compares it
with the goal), the date, the machine and the load average; ``--json`` also writes one JSON
line per row. Run it on a quiet machine (``uptime`` first). On a virtual machine whose speed
drifts (on the 2-core one here a row's ratio moved by up to ±25% between runs), ``--rounds 3``
runs each row's two processes three times, alternating, and reports the median over rounds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_load  # noqa: E402
import bench_lora_step  # noqa: E402

STEP_GOAL, TRAIN_RSS_GOAL, LOAD_GOAL, GENERATE_RSS_GOAL = 0.8, 0.6, 1.5, 0.8
FORWARD_GOAL, DECODE_GOAL = 1.0, 0.5
HERE = os.path.dirname(os.path.abspath(__file__))


def alternating(measure, rounds: int) -> dict | None:
    """``measure(framework)`` (a dict of numbers from a fresh process, or None if it failed) for
    PyTorch and minipeft in turn, ``rounds`` times; per framework the median of each number
    over the rounds: a change of machine speed during the run then hits both alike."""
    runs = {"torch": [], "minipeft": []}
    for _ in range(rounds):
        for framework, results in runs.items():
            got = measure(framework)
            if got is None:
                return None
            results.append(got)
    return {fw: {key: statistics.median(r[key] for r in results) for key in results[0]} for fw, results in runs.items()}


def step_rows(name: str, folder: str, threads: int, batch: int, seq: int, repeats: int, rounds: int) -> list[dict]:
    """A LoRA step's time and the process's peak RSS, PyTorch + PEFT and minipeft."""
    args = SimpleNamespace(batch=batch, seq=seq, repeats=repeats)
    got = alternating(lambda fw: bench_lora_step.run_child(fw, "lora", folder, threads, args), rounds)
    if got is None:
        return []
    where = f"{name}, {batch}×{seq}, {threads} thread{'s' if threads > 1 else ''}"
    return [row(f"LoRA step, {where}", "s", got["minipeft"]["step_s"], got["torch"]["step_s"], STEP_GOAL),
            row(f"peak RSS, LoRA training, {where}", "MB", got["minipeft"]["peak_rss_mb"],
                got["torch"]["peak_rss_mb"], TRAIN_RSS_GOAL)]


def inference_rows(name: str, folder: str, batch: int, seq: int, tasks: list[str], repeats: int,
                   rounds: int) -> list[dict]:
    """A no-grad forward over batch × seq tokens and / or 64 greedy tokens at batch 1, 1 thread,
    each framework in its own process (bench_inference.py)."""
    def measure(framework):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [sys.executable, os.path.join(HERE, "bench_inference.py"), "--model", folder, "--framework", framework,
               "--json", "--tasks", *tasks, "--batch", str(batch), "--seq", str(seq), "--new-tokens", "64",
               "--repeats", str(repeats), "--threads", "1"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  ({framework} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]})", file=sys.stderr)
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])

    got = alternating(measure, rounds)
    if got is None:
        return []
    out = []
    if "forward" in tasks:
        out.append(row(f"forward without grad, {name}, {batch}×{seq}, 1 thread", "s", got["minipeft"]["forward"],
                       got["torch"]["forward"], FORWARD_GOAL))
    if "generate" in tasks:
        out.append(row(f"greedy decode, 64 tokens, batch 1, {name}, 1 thread", "s", got["minipeft"]["generate"],
                       got["torch"]["generate"], DECODE_GOAL))
    return out


def load_rows(folder: str, repeats: int) -> list[dict]:
    """Load time, and load + generate peak RSS, minipeft and transformers alternating."""
    args = SimpleNamespace(new_tokens=32, threads=1)
    out = []
    for task, key, what, goal in (("load", "seconds", "load time", LOAD_GOAL),
                                  ("generate", "peak_rss_mb", "peak RSS, load + 32 greedy tokens", GENERATE_RSS_GOAL)):
        runs = {"minipeft": [], "transformers": []}
        for _ in range(repeats):
            for framework in runs:  # alternate, so machine load hits both alike
                runs[framework].append(bench_load.measure(framework, task, folder, args)[key])
        unit = "s" if key == "seconds" else "MB"
        out.append(row(f"{what}, SmolLM2-135M f32", unit, statistics.median(runs["minipeft"]),
                       statistics.median(runs["transformers"]), goal))
    return out


def row(what: str, unit: str, ours: float, theirs: float, goal: float) -> dict:
    ratio = ours / theirs
    return {"row": what, "unit": unit, "minipeft": ours, "pytorch": theirs, "ratio": ratio, "goal": goal,
            "met": ratio <= goal}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smollm", metavar="FOLDER", default=None, help="SmolLM2-135M float32 folder (else skipped)")
    p.add_argument("--repeats", type=int, default=5, help="steps (or fresh processes) per median (default 5)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the frameworks' processes this many times per row, median over rounds (default 1)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write one JSON line per row")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        folders = bench_lora_step.make_model_folders(root)
        for name, label in (("stories15m", "stories15M shape"), ("bundled", "bundled stories260K")):
            for threads in (1, 2):
                rows += step_rows(label, folders[name], threads, 8, 256, args.repeats, args.rounds)
                print(f"  done: {label}, {threads} thread(s)", file=sys.stderr, flush=True)
        rows += inference_rows("bundled stories260K", folders["bundled"], 8, 256, ["forward"], args.repeats,
                               args.rounds)
    if args.smollm and os.path.isdir(args.smollm):
        rows += step_rows("SmolLM2-135M", args.smollm, 1, 4, 128, args.repeats, args.rounds)
        rows += inference_rows("SmolLM2-135M", args.smollm, 1, 22, ["forward", "generate"], args.repeats, args.rounds)
        rows += load_rows(args.smollm, args.repeats)
    else:
        print(f"skipping the SmolLM2 rows: {'no --smollm folder' if not args.smollm else args.smollm + ' is not a folder'}"
              " (benchmarks never download)", file=sys.stderr)
    print(f"{datetime.date.today()}, {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; medians of {args.repeats}"
          f"{f', median over {args.rounds} alternating rounds of processes' if args.rounds > 1 else ''}\n")
    print("| row | minipeft | PyTorch | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fmt = "{:.3f} s" if r["unit"] == "s" else "{:,.0f} MB"
        print(f"| {r['row']} | {fmt.format(r['minipeft'])} | {fmt.format(r['pytorch'])} | {r['ratio']:.2f}× | "
              f"≤ {r['goal']}× | {'yes' if r['met'] else 'no'} |")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
