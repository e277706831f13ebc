"""``minipeft train``: fine-tune a model with a PEFT method on a JSONL file.

The run folder (``--out``) receives checkpoints (``checkpoint-N/``, as transformers names
them, written atomically), ``metrics.jsonl``, ``loss.png`` (with matplotlib) and, at the
end, the trained adapter itself (``adapter_config.json`` + weights), so that ``--out`` is
what ``generate --adapter`` and ``PeftModel.from_pretrained`` take.

* ``--resume`` continues the latest checkpoint exactly where it stopped; with a larger
  ``--steps`` it extends a finished (or stopped) run, following the schedule asked for now
  (one warning line says what changed).
* ``--init-adapter DIR`` starts a fresh run (fresh optimizer, step 0) from an adapter
  already trained: it is loaded trainable, as ``PeftModel.from_pretrained(...,
  is_trainable=True)`` does, with its own settings; a ``--method`` that differs is refused.
* ``--warmup`` is a number of steps or, below 1, a share of ``--steps`` (transformers'
  ``warmup_steps``); the default, 5% of the steps, fits a run of any length.
* Progress: a bar on a terminal, else a line every ``--log-every`` steps.
* Ctrl-C saves a checkpoint at the step reached; ``--resume`` continues it.

Errors and warnings speak in this command's flags: :func:`in_flag_words` turns the
training API's field names (``max_steps``, ``resume=True``) into ``--steps``, ``--resume``.

The methods and their options come from the method table (minipeft/peft/core/registry.py):
each row's ``cli`` names its ``--method`` values, its options, how they build its config,
and what it reports after training. A new method is added in its own file only.
"""
from __future__ import annotations

import contextlib
import re
import sys

from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import read_json
from ..io.tokenizer import Tokenizer
from ..models import LlamaForCausalLM
from ..peft import METHODS, PeftModel, get_peft_model
from ..peft.core import registry
from ..peft.core.saving import read_config
from ..train import Trainer, TrainingArguments, evaluate, load_datasets
from ..train.checkpoint import find_latest_checkpoint, prepare_output_dir
from .common import add_model_option, model_folder, say

# TrainingArguments field -> the flag that sets it (what error messages name)
FLAGS = {"max_steps": "--steps", "batch_size": "--batch-size", "grad_accum_steps": "--grad-accum", "lr": "--lr",
         "weight_decay": "--weight-decay", "warmup_steps": "--warmup", "schedule": "--schedule",
         "restart_every": "--restart-every", "restart_warmup_steps": "--restart-warmup",
         "min_lr_ratio": "--min-lr-ratio", "max_grad_norm": "--max-grad-norm", "seed": "--seed",
         "eval_every": "--eval-every", "save_every": "--save-every", "log_every": "--log-every",
         "seq_len": "--seq-len", "packing": "--packing", "eval_fraction": "--eval-fraction",
         "output_dir": "--out", "threads": "--threads", "eval_batch_size": "--batch-size"}
_FIELD = "|".join(sorted(FLAGS, key=len, reverse=True))


def in_flag_words(text: str) -> str:
    """A training message in this command's words: ``TrainingArguments.max_steps`` and
    ``max_steps=400`` become ``--steps`` and ``--steps 400``, ``resume=True`` ``--resume``.
    Only field names written as such are changed (``TrainingArguments.x``, ``x=``, ``x:``, or
    any name with an underscore), never the same word in prose."""
    text = text.replace("resume=True", "--resume")
    text = re.sub(rf"\bTrainingArguments\.({_FIELD})\b", lambda m: FLAGS[m.group(1)], text)
    text = re.sub(rf"(?<![\w.-])({_FIELD})=", lambda m: FLAGS[m.group(1)] + " ", text)
    text = re.sub(rf"(?<![\w.-])({_FIELD}):", lambda m: FLAGS[m.group(1)] + ":", text)
    return re.sub(rf"(?<![\w.-])({'|'.join(f for f in FLAGS if '_' in f)})\b", lambda m: FLAGS[m.group(1)], text)


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


def steps_or_share(text: str) -> int | float:
    """``--warmup``: an integer number of steps, or a share of the steps in [0, 1)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with a PEFT method on a JSONL file",
                       description=__doc__.splitlines()[0].strip("`"))
    add_model_option(p)
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help="records with 'text', or 'prompt'/'completion', or alpaca 'instruction'/'input'/'output'")
    p.add_argument("--eval-data", metavar="FILE.jsonl", default=None, help="held-out records (else --eval-fraction)")
    p.add_argument("--eval-fraction", type=float, default=0.1, metavar="SHARE",
                   help="share of --data held out when no --eval-data is given")
    p.add_argument("--method", choices=list(method_choices()), default=None,
                   help="the PEFT method (default: lora, or the method of --init-adapter)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder: checkpoint-N/, metrics.jsonl, loss.png, and the final adapter itself")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest checkpoint in --out (with a larger --steps: extend the run)")
    p.add_argument("--init-adapter", metavar="DIR", default=None,
                   help="start from this trained adapter (its own settings, trainable, fresh optimizer)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=200, metavar="N", help="optimizer updates in all")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    t.add_argument("--batch-size", type=int, default=8, metavar="N", help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per update")
    t.add_argument("--seq-len", type=int, default=256, metavar="N", help="tokens per example (longer: cut)")
    t.add_argument("--schedule", choices=["constant", "linear", "cosine", "jagged_cosine"], default="cosine",
                   help="learning-rate schedule after the warmup")
    t.add_argument("--restart-every", type=int, default=None, metavar="N",
                   help="jagged_cosine: LR restart period (default: --relora-every)")
    t.add_argument("--restart-warmup", type=int, default=10, metavar="N",
                   help="jagged_cosine: warmup steps after a restart")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, metavar="R", help="jagged_cosine: LR floor / lr")
    t.add_argument("--warmup", type=steps_or_share, default=0.05, metavar="N|SHARE",
                   help="linear warmup: a number of steps, or below 1 a share of --steps (rounded up)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this")
    t.add_argument("--eval-every", type=int, default=50, metavar="N", help="evaluate every N steps (0: at the end)")
    t.add_argument("--save-every", type=int, default=50, metavar="N",
                   help="write checkpoint-N every N steps (0: at the end)")
    t.add_argument("--log-every", type=int, default=10, metavar="N",
                   help="metrics.jsonl line every N steps; also a progress line when stderr is not a terminal")
    t.add_argument("--packing", action="store_true", help="pack examples into full seq-len blocks")
    t.add_argument("--seed", type=int, default=0, help="data order, eval split and the adapter's initialisation")
    add_method_options(p)
    p.set_defaults(run=run, words=in_flag_words)


def training_arguments(args) -> TrainingArguments:
    """The run's TrainingArguments, validated before anything is loaded (errors name the flag)."""
    return TrainingArguments(
        output_dir=args.out, max_steps=args.steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup, schedule=args.schedule,
        max_grad_norm=args.max_grad_norm, seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
        log_every=args.log_every, seq_len=args.seq_len, packing=args.packing,
        eval_fraction=0.0 if args.eval_data else args.eval_fraction,
        restart_every=args.restart_every or getattr(args, "relora_every", 0) or 0,
        restart_warmup_steps=args.restart_warmup, min_lr_ratio=args.min_lr_ratio, threads=args.threads)


def run(args) -> int:
    training = training_arguments(args)
    if not 0 <= args.eval_fraction < 1:  # checked also when --eval-data makes it unused
        raise ConfigError(f"--eval-fraction must be a number in [0, 1), got {args.eval_fraction!r}")
    prepare_output_dir(args.out)
    # a builder may need the run it continues (FishMask: the mask whose sizes the saved parameters have)
    args.resume_checkpoint = _check_run_folder(args)
    init_config = _init_adapter_config(args) if args.init_adapter else None
    folder = model_folder(args)
    tokenizer = Tokenizer.from_pretrained(folder)
    train, evals = _datasets(args, tokenizer)
    say(f"train: {len(train)} examples, {train.num_tokens} tokens"
        + (f"; eval: {len(evals)} examples" if evals is not None else ""))
    base = LlamaForCausalLM.from_pretrained(folder, device=args.device)
    if init_config is not None:
        model = PeftModel.from_pretrained(base, args.init_adapter, is_trainable=True, seed=args.seed)
        method = registry.get_method(init_config.peft_type)
        say(f"init: the {init_config.peft_type} adapter of '{args.init_adapter}' (its own settings, trainable; "
            "a fresh optimizer)")
    else:
        method, build = method_choices()[args.method or "lora"]
        model = get_peft_model(base, build(args), seed=args.seed)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for results only
        model.print_trainable_parameters()
    summary = Trainer(model, training, train, evals).train(resume=args.resume)
    model.save_pretrained(args.out)  # the final adapter: --out itself, as PEFT / transformers users expect
    if summary["train_loss"] is None:  # resumed a run that had already reached --steps
        line = f"step {summary['step']}: nothing left to train (ask for more with --resume --steps N)"
    else:
        line = f"step {summary['step']}: train loss {summary['train_loss']:.4f}"
    if summary["eval_loss"] is not None:
        line += f", eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_ppl']:.2f})"
    print(line)
    print(f"adapter: {args.out}")
    if method.cli is not None and method.cli.report is not None:
        method.cli.report(model, args, None if evals is None else
                          (lambda m: evaluate(m, evals, batch_size=args.batch_size)["eval_loss"]))
    return 0


def _check_run_folder(args):
    """What the trainer would refuse after loading everything, said first: a fresh run into a
    folder that holds checkpoints, ``--resume`` without one, or ``--steps`` below the steps done.
    Returns the checkpoint a ``--resume`` continues (else None)."""
    latest = find_latest_checkpoint(args.out)
    if not args.resume:
        if latest is not None:
            raise CheckpointError(f"'{args.out}' already holds checkpoints (latest: {latest.name}); pass --resume "
                                  "to continue that run, or choose another --out")
        return None
    if latest is None:
        raise CheckpointError(f"--resume, but '{args.out}' holds no checkpoint (checkpoint-N folder)")
    done = read_json(latest / "trainer_state.json", "trainer state").get("step")
    if isinstance(done, int) and done > args.steps:
        raise ConfigError(f"--steps {args.steps} is below the {done} steps '{latest}' has done; "
                          f"ask for at least {done}")
    return latest


def _init_adapter_config(args):
    """The config of --init-adapter; a --method that names another method is refused."""
    config = read_config(args.init_adapter)
    if args.method is not None:
        asked = method_choices()[args.method][0]
        dora = bool(getattr(config, "use_dora", False))
        if asked.peft_type != config.peft_type or (args.method in ("lora", "dora") and (args.method == "dora") != dora):
            have = "dora" if dora else next((n for n, (m, _) in method_choices().items()
                                             if m.peft_type == config.peft_type), config.peft_type)
            raise ConfigError(f"--init-adapter '{args.init_adapter}' holds a {have} adapter "
                              f"(peft_type {config.peft_type}), not --method {args.method}; leave --method out "
                              "to train it as it is")
    return config


def _datasets(args, tokenizer):
    """(train, eval) as the run uses them (the same split for the same --seed)."""
    eval_fraction = 0.0 if args.eval_data else args.eval_fraction
    return load_datasets(args.data, tokenizer, args.seq_len, eval_path=args.eval_data,
                         eval_fraction=eval_fraction, packing=args.packing, seed=args.seed)
