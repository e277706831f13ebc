"""One DyLoRA run, eight adapters: train r_max = 8 once, then use any rank 1..8.

DyLoRA (Valipour et al., 2023) trains a LoRA adapter whose leading b rows of A and columns
of B are a good rank-b adapter on their own, for every b: each step draws b from
{r_min, ..., r_max} and trains only that truncation (scaled by α/b). Afterwards the same
adapter is evaluated — or merged and shipped — at whichever rank is good enough.

    python examples/dylora_ranks.py [--steps 120] [--frozen] [--out runs/dylora_ranks]

Trains on examples/data/zoe_stories.jsonl (stories from the bundled stories260K with
the heroine renamed Zoe; see examples/lora_zoe.py) and prints the eval loss at every rank.
Try ``minipeft merge --adapter runs/dylora_ranks/adapter --rank 4 --out merged4`` to
export the rank-4 adapter as a plain model.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import minipeft as mp
from minipeft.train import Trainer, TrainingArguments, evaluate
from minipeft.peft.lowrank.dylora import format_rank_table, loss_per_rank
from story_data import bundled_model_and_stories



def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--frozen", action="store_true", help="train only row / column b at each step")
    p.add_argument("--out", default="runs/dylora_ranks")
    args = p.parse_args()

    base, tok, train, evals = bundled_model_and_stories()
    print(f"data: {len(train)} train / {len(evals)} eval stories; base model eval loss "
          f"{evaluate(base, evals)['eval_loss']:.4f}")

    config = mp.peft.DyLoraConfig(r=8, r_min=1, lora_alpha=16, lora_dropout=0.05, frozen=args.frozen,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = mp.peft.get_peft_model(base, config, seed=0)
    model.print_trainable_parameters()
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh run each time
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, batch_size=8, lr=3e-3,
                                 warmup_steps=10, schedule="cosine", save_every=args.steps, seq_len=256)
    start = time.perf_counter()
    Trainer(model, training, train, evals).train()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s "
          f"({'frozen: only row b learns' if args.frozen else 'all rows up to b learn'})")
    model.save_pretrained(Path(args.out) / "adapter")

    print("\neval loss of the one trained adapter at each rank b (scale alpha / b):")
    print(format_rank_table(loss_per_rank(model, lambda m: evaluate(m, evals)["eval_loss"], range(1, 9))))


if __name__ == "__main__":
    main()
