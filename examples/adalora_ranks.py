"""Where does a fine-tune need rank? AdaLoRA on the bundled story model, on the CPU, in about a minute.

AdaLoRA (Zhang et al., 2023) starts every adapted projection at rank init_r and, while
training, prunes the singular values whose importance (|w · ∇w|, smoothed) is lowest, until
the average rank is target_r. Here all seven projections of the five layers of stories260K
start at rank 12 and end at an average of 4, learning examples/data/zoe_stories.jsonl (the
model's own stories with Lily renamed Zoe; see examples/lora_zoe.py for the LoRA version).

    python examples/adalora_ranks.py [--steps 100] [--out runs/adalora_ranks]

Prints the eval loss before and after, the final rank of every module (rows q/k/v/o/gate/
up/down, columns the layer, as the paper's Figure 1), and writes that table as a heat map to
OUT/adalora_ranks.png (with matplotlib), next to the adapter in PEFT's layout (OUT/adapter,
A/E/B cropped to the kept ranks, rank_pattern in adapter_config.json).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import minipeft as mp
from minipeft.peft.lowrank import adalora_plot
from minipeft.train import Trainer, TrainingArguments, evaluate
from story_data import DATA, bundled_model_and_stories

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="runs/adalora_ranks")
    args = p.parse_args()

    base, tok, train, evals = bundled_model_and_stories()
    print(f"data: {len(train)} train / {len(evals)} eval stories from {DATA.name}")
    before = evaluate(base, evals)
    print(f"before: eval loss {before['eval_loss']:.4f}  perplexity {before['eval_ppl']:.3f}")

    # ranks fall from step tinit to total_step - tfinal along a cubic, then stay fixed
    tinit, tfinal = args.steps // 6, args.steps // 4
    config = mp.peft.AdaLoraConfig(init_r=12, target_r=4, tinit=tinit, tfinal=tfinal, deltaT=5,
                                   total_step=args.steps, lora_alpha=32, lora_dropout=0.05, target_modules=ALL)
    model = mp.peft.get_peft_model(base, config, seed=0)
    model.print_trainable_parameters()
    print(f"budget: {12 * 35} ranks -> {4 * 35} over the 35 modules, falling along a cubic from update "
          f"{tinit + 2} to update {args.steps - tfinal + 1} (masking every 5th), then fixed")
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh run each time
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, batch_size=8, lr=1e-2,
                                 warmup_steps=10, schedule="cosine", eval_every=50, save_every=0, seq_len=256)
    Trainer(model, training, train, evals).train()  # calls model.regularizer() and model.on_step_end(step)
    model.save_pretrained(Path(args.out) / "adapter")

    after = evaluate(model, evals)
    print(f"after:  eval loss {after['eval_loss']:.4f}  perplexity {after['eval_ppl']:.3f}")
    print("\nfinal rank per module:")
    print(adalora_plot.report(model, args.out))
    png = Path(args.out) / "adalora_ranks.png"
    print(f"\neval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}; adapter in {Path(args.out) / 'adapter'}"
          + (f"; heat map {png}" if png.exists() else " (install matplotlib for the heat map)"))


if __name__ == "__main__":
    main()
