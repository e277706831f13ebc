"""Give the bundled story model a new heroine without touching its weights: proxy-tuning.

Liu et al. (2024), "Tuning Language Models by Proxy" (arXiv:2401.08565): tune a SMALL
model, and at every decoding step add what the tuning changed in the small model's logits
to the big model's:

    z = z_big + α (z_small,tuned − z_small,untuned)

Here big = the bundled stories260K (5 layers, hidden 64), never changed; small = a 2-layer,
hidden-32 LLaMA with the same tokenizer, distilled from it by examples/distill_small.py
(run first when --small does not exist yet), fully fine-tuned on
examples/data/zoe_stories.jsonl (stories about "Zoe" where the model says "Lily"). The
tuned copy is the expert, the untouched small model the anti-expert.

    python examples/proxy_tuning.py [--small runs/small] [--out runs/proxy_zoe] [--steps 120] [--alpha 1]

Prints, for 24 stories sampled from BOS by each decoder, how many name Lily and how many
Zoe, and the loss on held-out Zoe stories. Measured (2 CPU cores, 76 s in all with the
distillation; about 10 s without):

    decoder                           Lily  Zoe   held-out Zoe loss
    bundled model alone                11    0    1.191
    small model, untuned               18    0    2.809
    small model, Zoe-tuned              0   23    2.275
    bundled, proxy-tuned (α = 1)        0   22    1.008

Then try the command line:

    minipeft generate --prompt "Once upon a time, there was a little girl named" --max-new-tokens 40 \\
        --proxy-expert runs/proxy_zoe/expert --proxy-antiexpert runs/small      # greedy: "... named Zoe."
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

import minipeft as mp
from minipeft.peft.additive.proxy_tuning import combine_logits, log_softmax
from minipeft.train import Trainer, TrainingArguments, evaluate
from minipeft.train.batches import iter_batches
from story_data import bundled_model_and_stories, sample_stories


def proxy_eval_loss(proxy, data) -> float:
    """Mean next-token loss of the combined distribution softmax(z) on ``data``: the same
    combination as decoding, at every position of each story at once."""
    total, count = 0.0, 0
    with mp.no_grad():
        for batch in iter_batches(data, 8):
            z = [m(batch.input_ids, attention_mask=batch.attention_mask).logits.numpy()
                 for m in (proxy.base, proxy.expert, proxy.antiexpert)]
            b, t, _ = z[0].shape
            flat = combine_logits(*(x.reshape(b * t, -1) for x in z), alpha=proxy.config.alpha)
            logp = log_softmax(flat).reshape(b, t, -1)[:, :-1]  # position t predicts token t + 1
            targets = batch.labels[:, 1:]
            keep = targets != -100
            total -= np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0][keep].sum()
            count += int(keep.sum())
    return total / count


def count_names(title, decoder, tok, loss, seed=0):
    start = time.perf_counter()
    greedy, stories = sample_stories(decoder, tok, n=24, seed=seed)
    lily, zoe = sum("Lily" in s for s in stories), sum("Zoe" in s for s in stories)
    print(f"\n== {title} ==  ({time.perf_counter() - start:.0f} s to sample)")
    print(f"loss on held-out Zoe stories {loss:.3f}")
    print(f"greedy: {greedy}")
    print(f"{len(stories)} sampled stories: {lily} mention Lily, {zoe} mention Zoe")
    return lily, zoe


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", default="runs/small", help="the distilled small model (made if missing)")
    p.add_argument("--out", default="runs/proxy_zoe")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning steps of the small model")
    p.add_argument("--alpha", type=float, default=1.0)
    args = p.parse_args()
    began = time.perf_counter()
    if not (Path(args.small) / "config.json").exists():
        from distill_small import distill  # noqa: PLC0415 - only when the small model is missing

        print(f"{args.small} does not exist: distilling the small model first")
        distill(args.small)

    big, tok, train, evals = bundled_model_and_stories()
    anti = mp.LlamaForCausalLM.from_pretrained(args.small)
    expert = mp.LlamaForCausalLM.from_pretrained(args.small)
    shutil.rmtree(args.out, ignore_errors=True)
    training = TrainingArguments(output_dir=str(Path(args.out) / "run"), max_steps=args.steps, batch_size=8,
                                 lr=3e-3, warmup_steps=5, schedule="cosine", seq_len=256, keep_checkpoints=1)
    start = time.perf_counter()
    Trainer(expert, training, train, evals).train()  # full fine-tuning: all 41K parameters
    print(f"tuned the small model on Zoe stories: {args.steps} steps in {time.perf_counter() - start:.0f} s")
    expert.save_pretrained(Path(args.out) / "expert")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (Path(args.small) / name).exists():
            shutil.copyfile(Path(args.small) / name, Path(args.out) / "expert" / name)

    # from the folders, so the tokenizers are checked to be the bundled model's
    proxy = mp.ProxyTuning.from_folders(mp.bundled_model_path(), Path(args.out) / "expert", args.small,
                                        alpha=args.alpha)
    results = {
        "bundled model alone": count_names("bundled model alone", big, tok, evaluate(big, evals)["eval_loss"]),
        "small model, untuned": count_names("small model, untuned (anti-expert)", anti, tok,
                                            evaluate(anti, evals)["eval_loss"]),
        "small model, Zoe-tuned": count_names("small model, Zoe-tuned (expert)", expert, tok,
                                              evaluate(expert, evals)["eval_loss"]),
        f"bundled, proxy-tuned (α={args.alpha:g})": count_names(
            f"bundled model proxy-tuned, α = {args.alpha:g}", proxy, tok, proxy_eval_loss(proxy, evals)),
    }
    print("\nstories naming Lily / Zoe, of 24 sampled from each (temperature 0.8):")
    for name, (lily, zoe) in results.items():
        print(f"  {name:<32} Lily {lily:>2}   Zoe {zoe:>2}")
    print(f"total {time.perf_counter() - began:.0f} s; expert saved to {Path(args.out) / 'expert'}")


if __name__ == "__main__":
    main()
