"""``minipeft lorahub``: compose trained LoRA adapters for a new task from a few examples.

Loads K adapter folders (PEFT's layout, same layers; same rank unless ``--exact``) onto
the model, searches their weights w with CMA-ES on the few-shot JSONL file (LoRAHub,
minipeft/peft/lowrank/lorahub.py), prints w and the few-shot loss of the composition next to
the base model and each single adapter, and writes the composed adapter (peft_type
LORA) to ``--out``, where PEFT and ``minipeft generate --adapter`` load it.
"""
from __future__ import annotations

import numpy as np

from ..io.tokenizer import Tokenizer
from ..models import LlamaForCausalLM
from ..peft.lowrank.lorahub import LoraHub, LoraHubConfig
from ..train import build_dataset, evaluate, read_jsonl
from .common import add_model_option, model_folder, say


def add_parser(sub) -> None:
    p = sub.add_parser("lorahub", help="compose LoRA adapters for a new task (LoRAHub); write the composition")
    add_model_option(p)
    p.add_argument("--adapters", nargs="+", required=True, metavar="DIR", help="LoRA adapter folders to compose")
    p.add_argument("--data", required=True, metavar="FEW.jsonl", help="a few examples of the new task")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the composed adapter")
    p.add_argument("--budget", type=int, default=40, help="evaluations of the objective (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact", action="store_true",
                   help="compose the exact sum Σ w_i s_i B_i A_i (concatenation) instead of mixing A and B")
    p.add_argument("--l1", type=float, default=0.05, help="weight of the mean |w| penalty (default 0.05)")
    p.add_argument("--seq-len", type=int, default=256, help="examples are cut to this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(run=run)


def run(args) -> int:
    folder = model_folder(args)
    tokenizer = Tokenizer.from_pretrained(folder)
    data = build_dataset(read_jsonl(args.data), tokenizer, args.seq_len, name=f"few-shot data '{args.data}'")
    config = LoraHubConfig(budget=args.budget, seed=args.seed, exact=args.exact, l1=args.l1)
    hub = LoraHub.from_pretrained(LlamaForCausalLM.from_pretrained(folder, device=args.device), args.adapters, config)

    def loss_fn(model):
        return evaluate(model, data, batch_size=args.batch_size)["eval_loss"]

    def progress(i, w, loss, value):
        say(f"[{i}/{args.budget}] w = {np.array2string(w, precision=3)}  loss {loss:.4f}  objective {value:.4f}")

    say(f"LoRAHub: {len(args.adapters)} adapters, {len(data)} examples ({data.num_tokens} tokens), "
        f"budget {args.budget}, {'exact sum' if args.exact else 'A and B mixed separately'}")
    found = hub.search(loss_fn, callback=progress)
    k = len(args.adapters)
    singles = [hub.objective(np.eye(k)[i], loss_fn)[0] for i in range(k)]  # w = e_i is adapter i itself
    base = hub.objective(np.zeros(k), loss_fn)[0]  # w = 0: ΔW = 0
    hub.set_weights(found.weights)
    hub.save_pretrained(args.out)
    width = max(len(a) for a in args.adapters + ["LoRAHub composition"])
    print("weights: " + "  ".join(f"{a}={w:+.4f}" for a, w in zip(args.adapters, found.weights)))
    print(f"few-shot loss ({len(data)} examples):")
    print(f"  {'base model':<{width}}  {base:.4f}")
    for adapter, loss in zip(args.adapters, singles):
        print(f"  {adapter:<{width}}  {loss:.4f}")
    print(f"  {'LoRAHub composition':<{width}}  {found.loss:.4f}  "
          f"(objective {found.objective:.4f} = loss + {args.l1:g} * mean|w|)")
    print(f"adapter: {args.out}")
    return 0
