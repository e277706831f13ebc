"""Loading speed and peak memory: minipeft next to transformers, one process per measurement.

    python examples/benchmarks/bench_load.py [--model DIR_OR_GGUF ...] [--repeats 5] [--threads 1]
                                             [--new-tokens 32] [--tasks load generate tokenizer] [--no-torch]

For each model (default: the bundled stories260K; add e.g. a float32 safetensors folder of
SmolLM2-135M, or a .gguf file for minipeft only) it runs two tasks:

- ``load``: the time ``from_pretrained`` takes, and the process's peak RSS after it;
- ``generate``: load, then greedy-decode ``--new-tokens`` tokens (batch 1, never stopping
  early); its peak RSS;
- ``tokenizer``: the time the tokenizer takes to load (``mp.Tokenizer.from_pretrained`` against
  transformers' ``AutoTokenizer``; from a .gguf, the ``tokenizer.ggml.*`` metadata).

Every measurement is a fresh child process (``--child``), so each peak is one load's own,
and the frameworks alternate (minipeft, transformers, minipeft, ...) so a change in machine
load hits both alike. The file is in the OS page cache after the first run (warm loads, for
both). Peak RSS is the child's own high-water mark (VmHWM on Linux, else
``resource.getrusage``); it includes the interpreter and the imported libraries, whose
share is shown on its own ("import RSS", after the imports).
File pages mapped by a memory-mapped load count once they are touched, as they do for
transformers (which maps safetensors files too). Medians of ``--repeats`` runs, a
Markdown table with ratios (minipeft ÷ transformers; < 1 means minipeft is faster or
smaller), then one JSON line per row.
Never downloads anything: paths are given, and a missing one is skipped with a message.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

FRAMEWORKS = ("minipeft", "transformers")
TASKS = ("load", "generate", "tokenizer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None,
                   help="HF model folder or .gguf file (repeatable; default: bundled stories260K)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["load", "generate"])
    p.add_argument("--no-torch", action="store_true", help="skip the transformers side")
    p.add_argument("--child", nargs=3, metavar=("FRAMEWORK", "TASK", "MODEL"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _peak_rss_mb() -> float:
    """This process's peak RSS. On Linux ``ru_maxrss`` survives fork + exec (a child starts
    with its parent's peak), so the kernel's per-process high-water mark VmHWM is read
    instead; elsewhere ``resource.getrusage``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_child(framework: str, task: str, model: str, new_tokens: int) -> dict:
    """One measurement in this (fresh) process; returns its numbers."""
    if framework == "minipeft":
        import numpy as np

        import minipeft as mp

        import_rss = _peak_rss_mb()
        start = time.perf_counter()
        if task == "tokenizer":
            mp.Tokenizer.from_pretrained(model)
        else:
            m = mp.LlamaForCausalLM.from_pretrained(model)
        seconds = time.perf_counter() - start
        if task == "generate":
            m.generate(np.array([[1]]), max_new_tokens=new_tokens, eos_token_id=-1)
    else:
        import torch
        import transformers

        import_rss = _peak_rss_mb()
        start = time.perf_counter()
        if task == "tokenizer":
            transformers.AutoTokenizer.from_pretrained(model)
        else:
            m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        seconds = time.perf_counter() - start
        if task == "generate":
            with torch.no_grad():
                m.generate(torch.tensor([[1]]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
    return {"seconds": seconds, "import_rss_mb": import_rss, "peak_rss_mb": _peak_rss_mb()}


def measure(framework, task, model, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, task, model,
           "--new-tokens", str(args.new_tokens)]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} {task} {model} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        framework, task, model = args.child
        print(json.dumps(run_child(framework, task, model, args.new_tokens)))
        return
    import minipeft as mp

    models = args.model or [str(mp.bundled_model_path())]
    frameworks = ["minipeft"] if args.no_torch else list(FRAMEWORKS)
    if not args.no_torch:  # find, not import: keep this parent process small
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            print("(torch / transformers not installed: minipeft only)", file=sys.stderr)
            frameworks = ["minipeft"]
    rows = []
    for model in models:
        if not os.path.exists(model):
            print(f"skipping {model}: no such file or folder (benchmarks never download)", file=sys.stderr)
            continue
        sides = ["minipeft"] if model.lower().endswith(".gguf") else frameworks
        for task in args.tasks:
            runs = {f: [] for f in sides}
            for _ in range(args.repeats):
                for framework in sides:  # alternate, so machine load hits both alike
                    runs[framework].append(measure(framework, task, model, args))
            for framework in sides:
                med = {k: statistics.median(r[k] for r in runs[framework]) for k in runs[framework][0]}
                rows.append({"model": model, "task": task, "framework": framework, **med,
                             "repeats": args.repeats, "threads": args.threads})
    print(f"{args.repeats} fresh processes per cell, medians, {args.threads} BLAS thread(s), "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| model | task | framework | load s | import RSS MB | peak RSS MB | ratio load s | ratio peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ref = next((r for r in rows if r["model"] == row["model"] and r["task"] == row["task"]
                    and r["framework"] == "transformers"), None)
        ratio_t = f"{row['seconds'] / ref['seconds']:.2f}×" if ref else "–"
        ratio_m = f"{row['peak_rss_mb'] / ref['peak_rss_mb']:.2f}×" if ref else "–"
        print(f"| {os.path.basename(row['model'].rstrip('/'))} | {row['task']} | {row['framework']} | "
              f"{row['seconds']:.3f} | {row['import_rss_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
              f"{ratio_t} | {ratio_m} |")
    print()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
