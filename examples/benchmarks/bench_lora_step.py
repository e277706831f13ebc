"""Time one PEFT training step (forward + backward + AdamW), minipeft next to PyTorch + PEFT.

    python examples/benchmarks/bench_lora_step.py [--repeats 5] [--threads 1 2] [--models bundled stories15m]
                                                  [--methods lora prompt prefix ia3]

Configurations: the bundled stories260K, and a random model shaped like
stories15M (hidden 288, intermediate 768, 6 layers, 6 heads, vocab 32000);
batch 8 × seq 256; the methods (``METHODS`` below, the same config in both frameworks):
LoRA r=8, alpha=16 on all seven projections; prompt tuning and prefix tuning with 20
virtual tokens; IA3 with PEFT's LLaMA defaults (k, v, down_proj). Both
frameworks load the same safetensors weights; the random model is drawn the way
transformers initialises one, N(0, 0.02²) (larger random weights make the softmax
produce subnormal floats, which slow PyTorch's CPU matmuls ~25x and would flatter
minipeft, whose cross-entropy flushes them). Each (framework, model, threads)
runs in its own process, so thread settings and peak memory are its own; the
step time is the median of ``--repeats`` steps after one warm-up step. Peak
RSS is the process's maximum resident memory, imports included (PyTorch's
own libraries weigh ~0.3-0.5 GB of it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STORIES15M = dict(vocab_size=32000, hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)


# method -> (minipeft config, PEFT config), built from the same arguments in both frameworks
METHODS = {
    "lora": ("LoraConfig", dict(r=8, lora_alpha=16, target_modules=TARGETS)),
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    "ia3": ("IA3Config", dict(task_type="CAUSAL_LM")),
}


def make_model_folders(root: str) -> dict[str, str]:
    import numpy as np

    import minipeft as mp

    folder = os.path.join(root, "stories15m-shape")
    config = mp.LlamaConfig(**STORIES15M)
    model = mp.LlamaForCausalLM(config, rng=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for name, p in model.named_parameters():  # transformers' init: N(0, 0.02²) weights, unit norms
        if p.ndim == 2:
            p.data = rng.normal(0.0, 0.02, p.shape).astype(np.float32)
    model.save_pretrained(folder)
    return {"bundled": mp.bundled_model_path(), "stories15m": folder}


def worker(framework: str, method: str, folder: str, batch: int, seq: int, repeats: int) -> dict:
    """Runs inside the child process: build, warm up, time ``repeats`` steps."""
    import resource

    import numpy as np

    # prompt tuning puts its virtual tokens in front: seq positions in all, as the model has (stories15M: 256)
    real = seq - METHODS[method][1]["num_virtual_tokens"] if method == "prompt" else seq
    ids = np.random.default_rng(0).integers(0, 512, size=(batch, real))
    if framework == "minipeft":
        import minipeft as mp
        from minipeft.allocator import keep_freed_memory
        from minipeft.train.optim import AdamW

        keep_freed_memory()  # as Trainer.train() does
        base = mp.LlamaForCausalLM.from_pretrained(folder)
        config_class, kwargs = METHODS[method]
        model = mp.peft.get_peft_model(base, getattr(mp.peft, config_class)(**kwargs))
        optimizer = AdamW(model.parameter_groups(), lr=1e-4)

        def step():
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        import peft
        import torch
        import transformers

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        config_class, kwargs = METHODS[method]
        model = peft.get_peft_model(base, getattr(peft, config_class)(**kwargs))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        t_ids = torch.tensor(ids)

        def step():
            model(input_ids=t_ids, labels=t_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times), "peak_rss_mb": peak_mb}


def run_child(framework, method, folder, threads, args) -> dict | None:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, __file__, "--worker", framework, method, folder, "--batch", str(args.batch),
           "--seq", str(args.seq), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        print(f"  ({framework} failed: {tail[0]})", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=3, metavar=("FRAMEWORK", "METHOD", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--models", nargs="+", default=["bundled", "stories15m"])
    p.add_argument("--methods", nargs="+", default=["lora"], choices=list(METHODS))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.seq, args.repeats)))
        return
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as root:
        folders = make_model_folders(root)
        for method in args.methods:
            print(f"{method}: {METHODS[method][0]}({METHODS[method][1]}); batch {args.batch} x seq {args.seq}; "
                  f"median of {args.repeats} steps")
        print(f"{'method':<7} {'model':<11} {'thr':>3} {'framework':<9} {'step s':>8} {'tok/s':>8} "
              f"{'peak RSS MB':>11} {'vs torch':>9}")
        for method in args.methods:
            for name in args.models:
                for threads in args.threads:
                    results = {fw: run_child(fw, method, folders[name], threads, args) for fw in ("torch", "minipeft")}
                    base = results["torch"]
                    for fw, r in results.items():
                        if r is None:
                            continue
                        ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
                        print(f"{method:<7} {name:<11} {threads:>3} {fw:<9} {r['step_s']:>8.3f} "
                              f"{tokens / r['step_s']:>8,.0f} {r['peak_rss_mb']:>11,.0f} {ratio:>9}", flush=True)


if __name__ == "__main__":
    main()
