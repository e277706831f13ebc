"""``minipeft train``: fine-tune a model with a PEFT method on a JSONL file.

The run folder (``--out``) receives checkpoints (``step-N/``, written atomically),
``metrics.jsonl``, ``loss.png`` (with matplotlib) and, at the end, the trained
adapter itself (``adapter_config.json`` + weights), so that ``--out`` is what
``generate --adapter`` and ``PeftModel.from_pretrained`` take. ``--resume`` continues
the latest checkpoint exactly where it stopped.

The methods and their options come from the method table (minipeft/peft/core/registry.py):
each row's ``cli`` names its ``--method`` values, its options, how they build its config,
and what it reports after training. A new method is added in its own file only.
"""
from __future__ import annotations

import contextlib
import sys

from ..io.tokenizer import Tokenizer
from ..models import LlamaForCausalLM
from ..peft import METHODS, get_peft_model
from ..train import Trainer, TrainingArguments, evaluate, load_datasets
from ..train.checkpoint import find_latest_checkpoint
from .common import add_model_option, model_folder, say


def method_choices() -> dict:
    """``--method`` name -> (method row, config builder), in table order."""
    return {name: (method, build) for method in METHODS if method.cli is not None
            for name, build in method.cli.configs.items()}


def add_method_options(parser) -> None:
    """Every method's options, each shared option once, under its method's heading."""
    added = set()
    for method in METHODS:
        if method.cli is None:
            continue
        group = parser.add_argument_group(method.cli.group or method.peft_type)
        for option in method.cli.options:
            if option.flags in added:
                continue
            added.add(option.flags)
            group.add_argument(*option.flags, **option.kwargs)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with a PEFT method on a JSONL file")
    add_model_option(p)
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help="records with 'text', or 'prompt'/'completion', or alpaca 'instruction'/'input'/'output'")
    p.add_argument("--eval-data", metavar="FILE.jsonl", default=None, help="held-out records (else --eval-fraction)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out (default 0.1)")
    p.add_argument("--method", choices=list(method_choices()), default="lora")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--schedule", choices=["constant", "linear", "cosine", "jagged_cosine"], default="cosine")
    t.add_argument("--restart-every", type=int, default=None,
                   help="jagged_cosine: LR restart period (default: --relora-every)")
    t.add_argument("--restart-warmup", type=int, default=10, help="jagged_cosine: warmup after a restart (default 10)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="jagged_cosine: LR floor / lr (default 0.1)")
    t.add_argument("--warmup", type=int, default=10, help="warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--save-every", type=int, default=50)
    t.add_argument("--packing", action="store_true", help="pack examples into full seq-len blocks")
    t.add_argument("--seed", type=int, default=0)
    add_method_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    folder = model_folder(args)
    tokenizer = Tokenizer.from_pretrained(folder)
    method, build = method_choices()[args.method]
    # a builder may need the run it continues (FishMask: the mask whose sizes the saved parameters have)
    args.resume_checkpoint = find_latest_checkpoint(args.out) if args.resume else None
    config = build(args)
    train, evals = _datasets(args, tokenizer)
    say(f"train: {len(train)} examples, {train.num_tokens} tokens"
        + (f"; eval: {len(evals)} examples" if evals is not None else ""))
    model = get_peft_model(LlamaForCausalLM.from_pretrained(folder, device=args.device), config, seed=args.seed)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for results only
        model.print_trainable_parameters()
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup, schedule=args.schedule,
        max_grad_norm=args.max_grad_norm, seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
        seq_len=args.seq_len, packing=args.packing, restart_every=args.restart_every or args.relora_every,
        restart_warmup_steps=args.restart_warmup, min_lr_ratio=args.min_lr_ratio)
    summary = Trainer(model, training, train, evals).train(resume=args.resume)
    model.save_pretrained(args.out)  # the final adapter: --out itself, as PEFT / transformers users expect
    if summary["train_loss"] is None:  # resumed a run that had already reached --steps
        line = f"step {summary['step']}: nothing left to train"
    else:
        line = f"step {summary['step']}: train loss {summary['train_loss']:.4f}"
    if summary["eval_loss"] is not None:
        line += f", eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_ppl']:.2f})"
    print(line)
    print(f"adapter: {args.out}")
    if method.cli.report is not None:
        method.cli.report(model, args, None if evals is None else
                          (lambda m: evaluate(m, evals, batch_size=args.batch_size)["eval_loss"]))
    return 0


def _datasets(args, tokenizer):
    """(train, eval) as the run uses them (the same split for the same --seed)."""
    eval_fraction = 0.0 if args.eval_data else args.eval_fraction
    return load_datasets(args.data, tokenizer, args.seq_len, eval_path=args.eval_data,
                         eval_fraction=eval_fraction, packing=args.packing, seed=args.seed)
