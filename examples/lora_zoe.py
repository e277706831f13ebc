"""Teach the bundled story model a new heroine with LoRA, on the CPU, in about a minute.

stories260K (a 260K-parameter LLaMA trained on TinyStories) calls almost every
heroine "Lily". examples/data/zoe_stories.jsonl holds 240 stories sampled from
the model itself with Lily renamed Zoe (examples/data/make_zoe_stories.py made
it). A rank-8 LoRA on the attention and MLP projections — about 3% of the
weights — learns the new name; the base weights are never touched.

    python examples/lora_zoe.py [--steps 150] [--out runs/lora_zoe]

Prints eval loss / perplexity and generations before and after, and how many of
a batch of sampled stories name Lily or Zoe. The run folder gets checkpoints,
metrics.jsonl, loss.png (with matplotlib) and the adapter in PEFT's layout
(try ``minipeft generate --adapter runs/lora_zoe/adapter``).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import minipeft as mp
from minipeft.train import Trainer, TrainingArguments
from story_data import DATA, bundled_model_and_stories, report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="runs/lora_zoe")
    args = p.parse_args()

    base, tok, train, evals = bundled_model_and_stories()
    print(f"data: {len(train)} train / {len(evals)} eval stories from {DATA.name}")
    before = report("before fine-tuning", base, tok, evals)

    config = mp.peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = mp.peft.get_peft_model(base, config, seed=0)
    model.print_trainable_parameters()
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh run each time
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, batch_size=8, lr=3e-3,
                                 warmup_steps=10, schedule="cosine", eval_every=50, save_every=50, seq_len=256)
    Trainer(model, training, train, evals).train()
    model.save_pretrained(Path(args.out) / "adapter")

    after = report("after LoRA fine-tuning", model, tok, evals)
    print(f"\neval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}; "
          f"adapter saved to {Path(args.out) / 'adapter'}")


if __name__ == "__main__":
    main()
