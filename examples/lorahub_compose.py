"""Compose LoRA adapters for a task none of them was trained on, with LoRAHub, on the CPU.

Three small tasks on stories the bundled model (stories260K) sampled itself
(examples/data/make_lorahub_tasks.py made them): the heroine Lily is renamed Zoe, the
boy Tim is renamed Max, the park becomes the beach. One rank-4 LoRA is trained per task.
The held-out task is "Zoe at the beach" (Lily and the park in one story, both changed):
LoRAHub (Huang et al., 2023) searches the weights of the three adapters with CMA-ES on
8 stories of it, 40 evaluations, no gradients — once mixing A and B separately as the
paper's code does, once with the exact weighted sum of the ΔW's — and the held-out
loss (40 other stories) of every composition is printed next to the base model, each
single adapter and the plain average w = 1/K.

    python examples/lorahub_compose.py [--steps 80] [--out runs/lorahub]

The found compositions are saved in PEFT's layout (peft_type LORA):
``minipeft generate --adapter runs/lorahub/composed --prompt "Once upon a time"``.
The same search from the command line:
``minipeft lorahub --adapters runs/lorahub/zoe/adapter runs/lorahub/max/adapter
runs/lorahub/beach/adapter --data examples/data/lorahub_zoe_beach_fewshot.jsonl --out DIR``.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

import minipeft as mp
from minipeft.peft.lowrank.lorahub import LoraHub, LoraHubConfig
from minipeft.train import Trainer, TrainingArguments, build_dataset, evaluate, read_jsonl

DATA = Path(__file__).parent / "data"
TASKS = {"zoe": "Lily -> Zoe", "max": "Tim -> Max", "beach": "park -> beach"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def dataset(name, tok):
    return build_dataset(read_jsonl(DATA / f"lorahub_{name}.jsonl"), tok, seq_len=256, name=name)


def train_adapter(task, tok, steps, out) -> Path:
    """One rank-4 LoRA on one task; returns its adapter folder."""
    model = mp.peft.get_peft_model(mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path()),
                                   mp.peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=0)
    args = TrainingArguments(output_dir=str(out / task), max_steps=steps, batch_size=8, lr=5e-3, warmup_steps=5,
                             schedule="cosine", seq_len=256, progress=False, log_every=steps)
    start = time.perf_counter()
    summary = Trainer(model, args, dataset(task, tok)).train()
    model.save_pretrained(out / task / "adapter")
    print(f"trained {task:<5} ({TASKS[task]}): {steps} steps in {time.perf_counter() - start:.0f} s, "
          f"train loss {summary['train_loss']:.4f}")
    return out / task / "adapter"


def mentions(model, tok, n=24):
    """How many of n sampled stories (temperature 0.8) mention Zoe, the beach, Lily, the park."""
    with mp.no_grad():
        rows = model.generate(np.full((n, 1), tok.bos_token_id), max_new_tokens=80, temperature=0.8, seed=0)
    stories = [tok.decode(r.tolist()) for r in rows]
    return "  ".join(f"{w} {sum(w in s for s in stories):2d}" for w in ("Zoe", "beach", "Lily", "park"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--out", default="runs/lorahub")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    tok = mp.Tokenizer.from_pretrained(mp.bundled_model_path())
    folders = [train_adapter(task, tok, args.steps, out) for task in TASKS]

    fewshot, held_out = dataset("zoe_beach_fewshot", tok), dataset("zoe_beach_eval", tok)
    print(f"\nheld-out task: Zoe at the beach; {len(fewshot)} few-shot stories for the search, "
          f"{len(held_out)} others to evaluate on")
    k, rows = len(folders), []  # (hub, label, w) of every line of the table
    for exact in (False, True):
        mode = "exact" if exact else "A/B mix"
        config = LoraHubConfig(budget=40, seed=0, exact=exact)
        hub = LoraHub.from_pretrained(mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path()), folders, config)
        start = time.perf_counter()
        found = hub.search(lambda m: evaluate(m, fewshot)["eval_loss"])
        print(f"LoRAHub ({mode}): {config.budget} evaluations in {time.perf_counter() - start:.1f} s, w = "
              + "  ".join(f"{t} {w:+.3f}" for t, w in zip(TASKS, found.weights)))
        hub.save_pretrained(out / ("composed_exact" if exact else "composed"))
        if not exact:  # w = 0 and one-hot w are the same model in both modes
            rows += [(hub, "base model (w = 0)", np.zeros(k))]
            rows += [(hub, f"{t} adapter alone", np.eye(k)[i]) for i, t in enumerate(TASKS)]
        rows += [(hub, f"average w = 1/K, {mode}", np.full(k, 1 / k)), (hub, f"LoRAHub, {mode}", found.weights)]
    print(f"\n{'':<27}{'few-shot loss':>14}{'held-out loss':>15}   24 sampled stories mention")
    for hub, label, w in rows:
        hub.set_weights(w)
        print(f"{label:<27}{evaluate(hub.peft_model, fewshot)['eval_loss']:>14.4f}"
              f"{evaluate(hub.peft_model, held_out)['eval_loss']:>15.4f}   {mentions(hub.peft_model, tok)}")
    print(f"\ncomposed adapters: {out / 'composed'}, {out / 'composed_exact'}")


if __name__ == "__main__":
    main()
