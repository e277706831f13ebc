"""``minipeft generate``: continue a prompt with a model (greedy by default)."""
from __future__ import annotations

import time

import numpy as np

from ..errors import InputError
from ..io.tokenizer import Tokenizer
from ..models import LlamaForCausalLM
from .common import add_model_option, model_folder, say


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt; prints prompt + continuation on stdout")
    add_model_option(p)
    p.add_argument("--adapter", metavar="DIR", default=None, help="a PEFT adapter folder to apply")
    p.add_argument("--rank", type=int, default=None, metavar="b", help="run a DyLoRA adapter at rank b (<= its r)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from BOS)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    proxy = p.add_argument_group("proxy-tuning (Liu et al., 2024): steer --model, untouched, with a small "
                                 "tuned model's logit shift z = z_model + A (z_expert - z_antiexpert)")
    proxy.add_argument("--proxy-expert", metavar="DIR", default=None, help="the tuned small model's folder")
    proxy.add_argument("--proxy-expert-adapter", metavar="DIR", default=None,
                       help="a PEFT adapter folder applied to the expert (the tuning, when it is an adapter)")
    proxy.add_argument("--proxy-antiexpert", metavar="DIR", default=None, help="the untuned small model's folder")
    proxy.add_argument("--proxy-alpha", type=float, default=1.0, metavar="A", help="strength of the shift (1.0)")
    p.set_defaults(run=run)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt (or a tokenizer that adds nothing) starts from BOS."""
    ids = tokenizer.encode(prompt)
    if not prompt and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    if not ids:
        raise InputError("the prompt is empty and the tokenizer defines no BOS token to start from")
    return ids


def continuation_text(tokenizer: Tokenizer, prompt: str, ids: list[int], new_ids: list[int]) -> str:
    """The decoded continuation alone, so that prompt + continuation reads as decoded text."""
    prompt_text = tokenizer.decode(ids)
    full = tokenizer.decode(ids + new_ids)
    return full[len(prompt_text):] if full.startswith(prompt_text) else tokenizer.decode(new_ids)


def proxy_model(args, folder: str):
    """The proxy-tuned decoder the --proxy-* options ask for (None when none is given)."""
    if args.proxy_expert is None and args.proxy_antiexpert is None:
        if args.proxy_expert_adapter is not None:
            raise InputError("--proxy-expert-adapter needs --proxy-expert and --proxy-antiexpert")
        return None
    if args.proxy_expert is None or args.proxy_antiexpert is None:
        raise InputError("proxy-tuning needs both --proxy-expert and --proxy-antiexpert")
    if args.adapter or args.rank is not None:
        raise InputError("--adapter / --rank apply to a model alone; with proxy-tuning put the tuning in the "
                         "expert (--proxy-expert-adapter)")
    from ..peft.additive.proxy_tuning import ProxyTuning  # noqa: PLC0415 - only when asked for

    return ProxyTuning.from_folders(folder, args.proxy_expert, args.proxy_antiexpert,
                                    expert_adapter=args.proxy_expert_adapter, alpha=args.proxy_alpha,
                                    device=args.device)


def load_model(args, folder: str):
    """The model (or proxy-tuned decoder) the options ask for; anything with ``.generate``."""
    proxy = proxy_model(args, folder)
    if proxy is not None:
        return proxy
    if args.adapter:
        from .merge import load_with_adapter  # noqa: PLC0415 - PEFT only when asked for

        return load_with_adapter(folder, args.adapter, args.device, rank=args.rank)
    if args.rank is not None:
        raise InputError("--rank needs --adapter (a DyLoRA adapter folder)")
    return LlamaForCausalLM.from_pretrained(folder, device=args.device)


def run(args) -> int:
    folder = model_folder(args)
    model = load_model(args, folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    ids = prompt_ids(tokenizer, args.prompt)
    start = time.perf_counter()
    out = model.generate(np.array([ids]), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    elapsed = time.perf_counter() - start
    new_ids = out[0, len(ids):].tolist()
    print(args.prompt + continuation_text(tokenizer, args.prompt, ids, new_ids), flush=True)
    say(f"[{len(new_ids)} tokens in {elapsed:.2f} s, {len(new_ids) / max(elapsed, 1e-9):.1f} tokens/s]")
    return 0
