"""``minipeft train``: fine-tune a model with a PEFT method on a JSONL file.

The run folder (``--out``) receives checkpoints (``step-N/``, written atomically),
``metrics.jsonl``, ``loss.png`` (with matplotlib) and, at the end, the trained
adapter in Hugging Face PEFT's layout under ``OUT/adapter/``. ``--resume``
continues the latest checkpoint exactly where it stopped.

Each method adds its own options through ``METHOD_OPTIONS`` and builds its config
in ``METHOD_CONFIGS``; a new method registers one entry in each.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ..io.tokenizer import Tokenizer
from ..models import LlamaForCausalLM
from ..peft import LoraConfig, get_peft_model
from ..train import Trainer, TrainingArguments, load_datasets
from .common import add_model_option, model_folder, say


def _targets(text: str):
    """'q_proj,v_proj' -> a list; 'all-linear' stays a string, as PEFT expects."""
    return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def _lora_options(p) -> None:
    g = p.add_argument_group("LoRA / DoRA")
    g.add_argument("--r", type=int, default=8, help="rank (default 8)")
    g.add_argument("--alpha", type=float, default=16, help="lora_alpha (default 16; scale = alpha / r)")
    g.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter input (default 0.05)")
    g.add_argument("--target", default="q_proj,v_proj",
                   help="comma-separated module names, or all-linear (default q_proj,v_proj)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")


def _lora_config(args, use_dora: bool = False) -> LoraConfig:
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=_targets(args.target), use_rslora=args.rslora, use_dora=use_dora)


METHOD_OPTIONS = [_lora_options]
METHOD_CONFIGS = {
    "lora": lambda args: _lora_config(args),
    "dora": lambda args: _lora_config(args, use_dora=True),
}


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with a PEFT method on a JSONL file")
    add_model_option(p)
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help="records with 'text', or 'prompt'/'completion', or alpaca 'instruction'/'input'/'output'")
    p.add_argument("--eval-data", metavar="FILE.jsonl", default=None, help="held-out records (else --eval-fraction)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out (default 0.1)")
    p.add_argument("--method", choices=sorted(METHOD_CONFIGS), default="lora")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine")
    t.add_argument("--warmup", type=int, default=10, help="warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--save-every", type=int, default=50)
    t.add_argument("--packing", action="store_true", help="pack examples into full seq-len blocks")
    t.add_argument("--seed", type=int, default=0)
    for add in METHOD_OPTIONS:
        add(p)
    p.set_defaults(run=run)


def run(args) -> int:
    folder = model_folder(args)
    tokenizer = Tokenizer.from_pretrained(folder)
    config = METHOD_CONFIGS[args.method](args)
    eval_fraction = 0.0 if args.eval_data else args.eval_fraction
    train, evals = load_datasets(args.data, tokenizer, args.seq_len, eval_path=args.eval_data,
                                 eval_fraction=eval_fraction, packing=args.packing, seed=args.seed)
    say(f"train: {len(train)} examples, {train.num_tokens} tokens"
        + (f"; eval: {len(evals)} examples" if evals is not None else ""))
    model = get_peft_model(LlamaForCausalLM.from_pretrained(folder, device=args.device), config, seed=args.seed)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for results only
        model.print_trainable_parameters()
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup, schedule=args.schedule,
        max_grad_norm=args.max_grad_norm, seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
        seq_len=args.seq_len, packing=args.packing)
    summary = Trainer(model, training, train, evals).train(resume=args.resume)
    adapter_dir = Path(args.out) / "adapter"
    model.save_pretrained(adapter_dir)
    line = f"step {summary['step']}: train loss {summary['train_loss']:.4f}"
    if summary["eval_loss"] is not None:
        line += f", eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_ppl']:.2f})"
    print(line)
    print(f"adapter: {adapter_dir}")
    return 0
