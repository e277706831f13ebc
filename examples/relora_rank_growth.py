"""ReLoRA: a rank-4 adapter whose accumulated update grows past rank 4.

ReLoRA (Lialin et al., 2023) trains a LoRA adapter, and every N steps merges it into the
weights (W ← W + s·B A), re-initialises A and B = 0 and prunes the optimizer's moments; the
learning rate follows a jagged cosine that restarts from 0 each time. Each cycle adds an
update of rank ≤ r, so after k restarts W − W₀ can have rank (k+1)·r.

    python examples/relora_rank_growth.py [--steps 120] [--every 30] [--out runs/relora_rank_growth]

Trains r = 4 on examples/data/zoe_stories.jsonl and prints, after each restart, the rank
of the total update W − W₀ of the adapted projections and the eval loss.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

import minipeft as mp
from minipeft.peft.lowrank.relora import accumulated_delta_rank, is_restart
from minipeft.train import Trainer, TrainingArguments, evaluate
from story_data import bundled_model_and_stories



def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=30, help="restart period N (default 30)")
    p.add_argument("--out", default="runs/relora_rank_growth")
    args = p.parse_args()

    base, tok, train, evals = bundled_model_and_stories()
    print(f"data: {len(train)} train / {len(evals)} eval stories; base model eval loss "
          f"{evaluate(base, evals)['eval_loss']:.4f}")

    config = mp.peft.ReLoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, reset_every=args.every, prune_ratio=0.99,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = mp.peft.get_peft_model(base, config, seed=0)
    model.print_trainable_parameters()

    print(f"\n{'after update':>12}  {'restarts':>8}  {'rank of W - W0 (min / median / max)':>36}  eval loss")
    restarts = 0
    hook = model.on_step_end

    def on_step_end(step):  # the trainer's hook, plus a report after each restart
        nonlocal restarts
        hook(step)
        if is_restart(step, args.every):
            restarts += 1
            ranks = list(accumulated_delta_rank(model).values())
            loss = evaluate(model, evals)["eval_loss"]
            print(f"{step + 1:>12}  {restarts:>8}  {min(ranks):>16} / {int(np.median(ranks)):>3} / {max(ranks):>3}"
                  f"          {loss:.4f}")

    model.on_step_end = on_step_end
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh run each time
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, batch_size=8, lr=3e-3, warmup_steps=10,
                                 schedule="jagged_cosine", restart_every=args.every, restart_warmup_steps=5,
                                 save_every=args.steps, seq_len=256)
    start = time.perf_counter()
    summary = Trainer(model, training, train, evals).train()
    ranks = list(accumulated_delta_rank(model).values())
    print(f"{args.steps:>12}  {restarts:>8}  {min(ranks):>16} / {int(np.median(ranks)):>3} / {max(ranks):>3}"
          f"          {summary['eval_loss']:.4f}   (end of training, in {time.perf_counter() - start:.0f} s)")
    model.save_pretrained(Path(args.out) / "adapter")  # + relora_merged.safetensors: the merged updates
    print(f"\nr = {config.r}; adapter (with its merged updates) saved to {Path(args.out) / 'adapter'}")


if __name__ == "__main__":
    main()
