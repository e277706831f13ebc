"""``minipeft train``: fine-tune a model with a PEFT method on a JSONL file.

The run folder (``--out``) receives checkpoints (``step-N/``, written atomically),
``metrics.jsonl``, ``loss.png`` (with matplotlib) and, at the end, the trained
adapter in Hugging Face PEFT's layout under ``OUT/adapter/``. ``--resume``
continues the latest checkpoint exactly where it stopped.

Each method adds its own options through ``METHOD_OPTIONS`` and builds its config
in ``METHOD_CONFIGS``; a new method registers one entry in each (and, optionally, what
it prints or draws after training in ``METHOD_REPORTS``: AdaLoRA's rank table and
``OUT/adalora_ranks.png``).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ..io.tokenizer import Tokenizer
from ..models import LlamaForCausalLM
from ..peft import LoraConfig, get_peft_model
from ..peft import adalora_plot
from ..peft.adalora import AdaLoraConfig
from ..peft.dylora import DyLoraConfig
from ..peft.relora import ReLoraConfig, accumulated_delta_rank, adapter_layers
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


def _adalora_options(p) -> None:
    g = p.add_argument_group("AdaLoRA (also uses --alpha, --dropout, --target; total_step = --steps)")
    g.add_argument("--init-r", type=int, default=12, help="initial rank of every module (default 12)")
    g.add_argument("--target-r", type=int, default=8, help="average rank the budget ends at (default 8)")
    g.add_argument("--tinit", type=int, default=0, help="steps before ranks are pruned (default 0)")
    g.add_argument("--tfinal", type=int, default=0, help="last steps with the final ranks fixed (default 0)")
    g.add_argument("--delta-t", type=int, default=1, help="prune every this many steps (default 1)")
    g.add_argument("--beta1", type=float, default=0.85, help="EMA of the sensitivity (default 0.85)")
    g.add_argument("--beta2", type=float, default=0.85, help="EMA of the uncertainty (default 0.85)")
    g.add_argument("--orth-reg-weight", type=float, default=0.5, help="orthogonal regulariser weight (default 0.5)")


def _adalora_config(args) -> AdaLoraConfig:
    return AdaLoraConfig(init_r=args.init_r, target_r=args.target_r, tinit=args.tinit, tfinal=args.tfinal,
                         deltaT=args.delta_t, beta1=args.beta1, beta2=args.beta2, orth_reg_weight=args.orth_reg_weight,
                         total_step=args.steps, lora_alpha=args.alpha, lora_dropout=args.dropout,
                         target_modules=_targets(args.target))


def _adalora_report(model, args) -> None:
    print(adalora_plot.report(model, args.out))  # the rank table; OUT/adalora_ranks.png with matplotlib


def _dylora_relora_options(p) -> None:
    g = p.add_argument_group("DyLoRA / ReLoRA (also use --r (DyLoRA's r_max), --alpha, --dropout, --target)")
    g.add_argument("--r-min", type=int, default=1, help="DyLoRA: smallest rank drawn in training (default 1)")
    g.add_argument("--dylora-frozen", action="store_true", help="DyLoRA: train only row / column b of A / B")
    g.add_argument("--relora-every", type=int, default=50,
                   help="ReLoRA: merge, re-init and prune the optimizer every this many steps (default 50)")
    g.add_argument("--relora-prune", type=float, default=0.99,
                   help="ReLoRA: share of the optimizer moments zeroed at a restart (default 0.99)")


def _dylora_config(args) -> DyLoraConfig:
    return DyLoraConfig(r=args.r, r_min=args.r_min, frozen=args.dylora_frozen, lora_alpha=args.alpha,
                        lora_dropout=args.dropout, target_modules=_targets(args.target))


def _relora_config(args) -> ReLoraConfig:
    return ReLoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=_targets(args.target), reset_every=args.relora_every,
                        prune_ratio=args.relora_prune)


def _dylora_report(model, args) -> None:
    from ..train.rank_sweep import format_rank_table, loss_per_rank  # noqa: PLC0415

    _, evals = _datasets(args, Tokenizer.from_pretrained(model_folder(args)))
    if evals is not None:
        print(format_rank_table(loss_per_rank(model, evals, range(1, args.r + 1), batch_size=args.batch_size)))


def _relora_report(model, args) -> None:
    ranks = accumulated_delta_rank(model)
    restarts = len(adapter_layers(model.get_base_model(), "default")[0][1].relora_merged["default"])
    print(f"relora: {restarts} restarts; rank of the total update W - W0 per module: "
          f"min {min(ranks.values())}, max {max(ranks.values())} (r = {args.r})")


METHOD_OPTIONS = [_lora_options, _adalora_options, _dylora_relora_options]
METHOD_CONFIGS = {
    "lora": lambda args: _lora_config(args),
    "dora": lambda args: _lora_config(args, use_dora=True),
    "adalora": _adalora_config,
    "dylora": _dylora_config,
    "relora": _relora_config,
}
# Optional: what a method prints or draws after training, (peft_model, args) -> None.
METHOD_REPORTS = {
    "adalora": _adalora_report,
    "dylora": _dylora_report,  # eval loss at every rank 1..r
    "relora": _relora_report,  # rank of the accumulated update
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
    for add in METHOD_OPTIONS:
        add(p)
    p.set_defaults(run=run)


def run(args) -> int:
    folder = model_folder(args)
    tokenizer = Tokenizer.from_pretrained(folder)
    config = METHOD_CONFIGS[args.method](args)
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
    adapter_dir = Path(args.out) / "adapter"
    model.save_pretrained(adapter_dir)
    if summary["train_loss"] is None:  # resumed a run that had already reached --steps
        line = f"step {summary['step']}: nothing left to train"
    else:
        line = f"step {summary['step']}: train loss {summary['train_loss']:.4f}"
    if summary["eval_loss"] is not None:
        line += f", eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_ppl']:.2f})"
    print(line)
    print(f"adapter: {adapter_dir}")
    if args.method in METHOD_REPORTS:
        METHOD_REPORTS[args.method](model, args)
    return 0


def _datasets(args, tokenizer):
    """(train, eval) as the run uses them (the same split for the same --seed)."""
    eval_fraction = 0.0 if args.eval_data else args.eval_fraction
    return load_datasets(args.data, tokenizer, args.seq_len, eval_path=args.eval_data,
                         eval_fraction=eval_fraction, packing=args.packing, seed=args.seed)
