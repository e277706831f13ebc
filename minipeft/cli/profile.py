"""``minipeft profile``: where a training step's time and memory go, per op (minipeft/profiler.py).

Builds the model with a PEFT method, draws a random batch of token ids (seed 0), runs
``--warmup`` unprofiled and ``--steps`` profiled training steps (forward, backward,
AdamW) and prints the table: time, bytes and calls per op class, the GEMMs' FLOP/s
against the machine's measured GEMM peak, the optimizer's share and the peak memory.
``--generate N`` profiles greedy decoding instead: N tokens at batch 1 from the BOS token,
with the base model, per token.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..models import LlamaForCausalLM
from .common import add_model_option, integer_at_least, model_folder, say

# method -> (config class in minipeft.peft, its arguments): the benchmarks' settings
METHODS = {
    "lora": ("LoraConfig", dict(r=8, lora_alpha=16, target_modules="all-linear")),  # the 7 projections
    "ia3": ("IA3Config", dict(task_type="CAUSAL_LM")),
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    "full": None,  # every weight trained, no adapter
}


positive, non_negative = integer_at_least(1), integer_at_least(0)


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="time and memory of a training step, per op")
    add_model_option(p)
    p.add_argument("--method", choices=sorted(METHODS), default="lora",
                   help="what to train: a PEFT method (LoRA: r=8 on all seven projections) or 'full'")
    p.add_argument("--batch", type=positive, default=8, help="sequences per step")
    p.add_argument("--seq", type=positive, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=positive, default=3, help="profiled steps (after the warm-up)")
    p.add_argument("--warmup", type=non_negative, default=1, metavar="N", help="unprofiled steps first")
    p.add_argument("--forward-only", action="store_true",
                   help="profile the forward alone, without gradients (as evaluation and generation run it)")
    p.add_argument("--generate", type=positive, default=None, metavar="N",
                   help="profile greedy decoding of N tokens (batch 1, from BOS, the base model) instead")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the extra step under tracemalloc that measures the peak memory")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import peft  # noqa: PLC0415 - PEFT only when asked for
    from ..profiler import profile_generation, profile_step  # noqa: PLC0415

    if args.device != "cpu":
        raise ConfigError(f"--device {args.device}: the profiler times NumPy on the CPU only")
    folder = model_folder(args)
    model = LlamaForCausalLM.from_pretrained(folder)
    if args.generate is not None:
        bos = model.config.bos_token_id if isinstance(model.config.bos_token_id, int) else 1
        say(f"profiling greedy decoding on {folder}: {args.generate} tokens from BOS, batch 1, "
            f"{args.warmup} warm-up run(s)")
        print(profile_generation(model, np.array([[bos]]), new_tokens=args.generate, warmup=args.warmup).format())
        return 0
    vocab_size = model.config.vocab_size
    if METHODS[args.method] is not None:
        config_class, kwargs = METHODS[args.method]
        model = peft.get_peft_model(model, getattr(peft, config_class)(**kwargs))
    ids = np.random.default_rng(0).integers(0, vocab_size, size=(args.batch, args.seq))
    say(f"profiling {'the forward of ' if args.forward_only else ''}{args.method} on {folder}: batch {args.batch} x {args.seq}, "
        f"{args.warmup} warm-up + {args.steps} step(s)")
    report = profile_step(model, ids, steps=args.steps, warmup=args.warmup, memory=args.memory,
                          train=not args.forward_only)
    print(report.format())
    return 0
