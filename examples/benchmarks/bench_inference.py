"""Forward and generation speed of a model, minipeft next to PyTorch + transformers.

    python examples/benchmarks/bench_inference.py [--model DIR] [--threads 1] [--repeats 5]
                                                  [--tasks forward generate] [--framework minipeft --json]

Prints tokens/s for: a no-grad forward over a batch (B × T), a training forward
+ backward over the same batch (all parameters trainable), and greedy generation
of N new tokens with the KV cache (batch 1). Each number is the median of
``--repeats`` runs after one warm-up. With torch and transformers installed the
same measurements run on the same weights in the same process and the table
gives minipeft's time relative to PyTorch's (> 1 means slower). Set the thread
count before NumPy loads: ``--threads`` sets OMP/OPENBLAS/MKL variables, then
imports. ``--framework`` measures one side only and ``--json`` prints its medians (seconds)
as one JSON line: run_all.py runs each framework in its own process that way.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model folder (default: bundled stories260K)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--framework", choices=("minipeft", "torch"), default=None, help="measure one side only")
    p.add_argument("--json", action="store_true", help="print the medians (seconds) as one JSON line")
    return p.parse_args()


TASKS = ("forward", "forward+backward", "generate")


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_minipeft(folder, args, ids):
    import numpy as np

    import minipeft as mp

    model = mp.LlamaForCausalLM.from_pretrained(folder)

    def forward():
        with mp.no_grad():
            model(ids)

    def train_step():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()

    eos = {"eos_token_id": -1}  # never stop early: every run makes the same number of tokens

    def generate():
        model.generate(np.array([[1]]), max_new_tokens=args.new_tokens, **eos)

    runs = {"forward": forward, "forward+backward": train_step, "generate": generate}
    return {task: median_time(runs[task], args.repeats) for task in args.tasks}


def bench_torch(folder, args, ids):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    t_ids = torch.tensor(ids)

    def forward():
        with torch.no_grad():
            model(input_ids=t_ids)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(input_ids=t_ids, labels=t_ids).loss.backward()

    def generate():
        with torch.no_grad():
            model.generate(torch.tensor([[1]]), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False)

    runs = {"forward": forward, "forward+backward": train_step, "generate": generate}
    return {task: median_time(runs[task], args.repeats) for task in args.tasks}


def main():
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    import minipeft as mp

    folder = args.model or mp.bundled_model_path()
    config = mp.LlamaConfig.from_json(os.path.join(folder, "config.json"))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(args.batch, args.seq))
    batch_tokens = args.batch * args.seq
    if args.framework:
        result = (bench_minipeft if args.framework == "minipeft" else bench_torch)(folder, args, ids)
        print(json.dumps(result) if args.json else result)
        return
    print(f"model {folder}, batch {args.batch} x seq {args.seq}, {args.new_tokens} generated tokens, "
          f"{args.threads} thread(s), median of {args.repeats}", file=sys.stderr)
    ours = bench_minipeft(folder, args, ids)
    theirs = None
    if not args.no_torch:
        try:
            theirs = bench_torch(folder, args, ids)
        except ImportError:
            print("(torch / transformers not installed: minipeft only)", file=sys.stderr)
    tokens = {"forward": batch_tokens, "forward+backward": batch_tokens, "generate": args.new_tokens}
    header = f"{'measurement':<18} {'minipeft tok/s':>15}"
    if theirs:
        header += f" {'torch tok/s':>12} {'time ratio':>11}"
    print(header)
    for name, seconds in ours.items():
        line = f"{name:<18} {tokens[name] / seconds:>15,.0f}"
        if theirs:
            line += f" {tokens[name] / theirs[name]:>12,.0f} {seconds / theirs[name]:>10.2f}x"
        print(line)


if __name__ == "__main__":
    main()
