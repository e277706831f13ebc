"""AdapterFusion on the LoRAHub example's tasks: fuse three bottleneck adapters for a task none
of them was trained on, on the CPU.

The three tasks of examples/lorahub_compose.py (stories the bundled stories260K sampled
itself): Lily renamed Zoe, Tim renamed Max, the park turned into the beach. One Pfeiffer
bottleneck adapter (the ``adapters`` library's seq_bn, reduction factor 4) is trained per
task. AdapterFusion (Pfeiffer et al., 2021) then learns, on the 8 few-shot stories of the
held-out task "Zoe at the beach", how to mix the three adapters' outputs at every layer
(query / key / value attention over the adapters; the adapters stay frozen), with the
library's regulariser 0.01·Σ‖I − V‖². The held-out loss (40 other stories) is printed next
to the base model and each single adapter; LoRAHub's numbers on the same split come from
``python examples/lorahub_compose.py``.

    python examples/fusion_compose.py [--steps 80] [--fusion-steps 40] [--out runs/fusion]

The fused model is saved in the ``adapters`` library's layout to OUT/fusion
(``minipeft generate --adapter runs/fusion/fusion --prompt "Once upon a time"``).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import minipeft as mp
from minipeft.train import Trainer, TrainingArguments, build_dataset, evaluate, read_jsonl

DATA = Path(__file__).parent / "data"
TASKS = {"zoe": "Lily -> Zoe", "max": "Tim -> Max", "beach": "park -> beach"}


def bundled():
    return mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path())


def dataset(name, tok):
    return build_dataset(read_jsonl(DATA / f"lorahub_{name}.jsonl"), tok, seq_len=256, name=name)


def train(model, data, steps, lr, out, warmup=5):
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=steps, batch_size=8, lr=lr, warmup_steps=warmup,
                             schedule="cosine", seq_len=256, progress=False, log_every=steps)
    start = time.perf_counter()
    summary = Trainer(model, args, data).train()
    model.save_pretrained(out)
    return summary, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80, help="training steps of each task adapter")
    p.add_argument("--fusion-steps", type=int, default=40, help="training steps of the fusion")
    p.add_argument("--out", default="runs/fusion")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    tok = mp.Tokenizer.from_pretrained(mp.bundled_model_path())

    folders = []
    for task, what in TASKS.items():
        model = mp.peft.get_peft_model(bundled(), mp.peft.SeqBnConfig(reduction_factor=4), seed=0)
        summary, seconds = train(model, dataset(task, tok), args.steps, 3e-3, out / task)
        print(f"trained {task:<5} ({what}): Pfeiffer adapter, {model.get_nb_trainable_parameters()[0]:,d} "
              f"parameters, {args.steps} steps in {seconds:.0f} s, train loss {summary['train_loss']:.4f}")
        folders.append(out / task)

    fewshot, held_out = dataset("zoe_beach_fewshot", tok), dataset("zoe_beach_eval", tok)
    print(f"\nheld-out task: Zoe at the beach; {len(fewshot)} few-shot stories to train the fusion on, "
          f"{len(held_out)} others to evaluate on")
    fused = mp.peft.get_peft_model(bundled(), mp.peft.AdapterFusionConfig(adapters=folders), seed=0)
    before = evaluate(fused, held_out)["eval_loss"]
    summary, seconds = train(fused, fewshot, args.fusion_steps, 1e-3, out / "fusion", warmup=0)
    print(f"fusion: {fused.get_nb_trainable_parameters()[0]:,d} trainable parameters (the adapters frozen), "
          f"{args.fusion_steps} steps in {seconds:.0f} s")

    rows = [("base model", evaluate(bundled(), fewshot)["eval_loss"], evaluate(bundled(), held_out)["eval_loss"])]
    for task, folder in zip(TASKS, folders):
        single = mp.peft.PeftModel.from_pretrained(bundled(), folder)
        rows.append((f"{task} adapter alone", evaluate(single, fewshot)["eval_loss"],
                     evaluate(single, held_out)["eval_loss"]))
    rows.append(("fusion, untrained (V = I)", None, before))
    rows.append(("AdapterFusion", evaluate(fused, fewshot)["eval_loss"], evaluate(fused, held_out)["eval_loss"]))
    print("\n| model | few-shot loss | held-out loss |\n|---|---|---|")
    for label, few, held in rows:
        print(f"| {label} | {'-' if few is None else f'{few:.4f}'} | {held:.4f} |")
    print(f"\nfused adapter: {out / 'fusion'}")


if __name__ == "__main__":
    main()
