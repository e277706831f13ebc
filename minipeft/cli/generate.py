"""``minipeft generate``: continue a prompt with a model (greedy by default), printing as it goes.

The sampling flags are transformers' ``generate`` arguments (``--do-sample``,
``--temperature``, ``--top-k``, ``--top-p``, ``--repetition-penalty``,
``--num-return-sequences``); a bad value is a one-line error naming the flag, and a
flag that greedy decoding ignores is a one-line warning. ``--chat`` sends the prompt
as one user turn through the model's chat template and prints the reply alone.
With ``--adapter`` and no ``--model``, the base model is the one the adapter was
trained on (``base_model_name_or_path`` in adapter_config.json) when that is a
local folder, as PEFT's ``AutoPeftModelForCausalLM`` does.
"""
from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.checkpoint import read_json
from ..io.tokenizer import Tokenizer
from ..models import LlamaForCausalLM
from ..models.stop_strings import checked_stop_strings
from ..models.generation import decoding_options, stop_ids_of
from .common import add_model_option, model_folder, say
from .streaming import TextStream, continuation_text, one_line_warnings

# generate()'s argument for each flag, so errors speak in flags (the CLI user never saw the names)
FLAG_OF = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
           "top_p": "--top-p", "repetition_penalty": "--repetition-penalty", "do_sample": "--do-sample",
           "num_return_sequences": "--num-return-sequences", "past_max_positions": "--past-max-positions",
           "stop_strings": "--stop"}


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt; prints prompt + continuation on stdout")
    add_model_option(p)
    add_adapter_options(p)
    p.add_argument("--prompt", default="", help="text to continue (empty: start from BOS)")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as a user message through the chat template; print the reply")
    p.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message first")
    add_sampling_options(p)
    proxy = p.add_argument_group("proxy-tuning (Liu et al., 2024): steer --model, untouched, with a small "
                                 "tuned model's logit shift z = z_model + A (z_expert - z_antiexpert)")
    proxy.add_argument("--proxy-expert", metavar="DIR", default=None, help="the tuned small model's folder")
    proxy.add_argument("--proxy-expert-adapter", metavar="DIR", default=None,
                       help="a PEFT adapter folder applied to the expert (the tuning, when it is an adapter)")
    proxy.add_argument("--proxy-antiexpert", metavar="DIR", default=None, help="the untuned small model's folder")
    proxy.add_argument("--proxy-alpha", type=float, default=1.0, metavar="A", help="strength of the shift (1.0)")
    p.set_defaults(run=run)


def add_adapter_options(p) -> None:
    """--adapter and --rank, shared with ``minipeft chat``."""
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a PEFT adapter folder to apply (without --model: on the base model it names)")
    p.add_argument("--rank", type=int, default=None, metavar="b", help="run a DyLoRA adapter at rank b (<= its r)")


def add_sampling_options(p, max_new_tokens: int = 256) -> None:
    """The decoding flags, shared with ``minipeft chat``; transformers' names and meanings."""
    g = p.add_argument_group("decoding (as transformers' generate; greedy unless --do-sample)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--do-sample", action="store_true", default=None,
                   help="sample (defaults then as transformers: temperature 1.0, top-k 50, top-p 1.0)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; given alone, a value > 0 also samples (0: greedy)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of mass >= p")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the text (1.0: off)")
    g.add_argument("--num-return-sequences", type=int, default=1, metavar="N",
                   help="N sampled continuations, one per line")
    g.add_argument("--past-max-positions", choices=("warn", "stop"), default="warn",
                   help="past the model's max_position_embeddings: warn and go on, or stop")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text once it contains TEXT, which stays in it (repeatable; transformers' "
                        "stop_strings)")
    g.add_argument("--seed", type=int, default=None)


def decoding_kwargs(args) -> dict:
    """generate()'s keyword arguments from the decoding flags."""
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                num_return_sequences=args.num_return_sequences, past_max_positions=args.past_max_positions,
                seed=args.seed, stop_strings=args.stop)


def in_flags(message: str) -> str:
    """``message`` with generate()'s argument names replaced by the CLI's flags."""
    message = message.replace("pass do_sample=False", "leave out --do-sample").replace("do_sample=True", "--do-sample")
    for name, flag in FLAG_OF.items():
        message = re.sub(rf"(?<![\w-]){name}(=|\b)", lambda m, flag=flag: flag + (" " if m.group(1) else ""), message)
    return message


def check_decoding(kwargs: dict) -> None:
    """Refuse bad decoding flags, and warn about ignored ones, before anything is printed."""
    try:
        with one_line_warnings(in_flags):
            decoding_options(**{k: v for k, v in kwargs.items()
                                if k not in ("seed", "past_max_positions", "stop_strings")})
            if kwargs.get("stop_strings") is not None:
                checked_stop_strings(kwargs["stop_strings"])
    except InputError as exc:
        raise InputError(in_flags(str(exc))) from None


def run_generation(model, ids, streamer=None, **kwargs):
    """model.generate with one-line warnings and errors that name flags (check_decoding has
    already said what greedy decoding ignores)."""
    try:
        with one_line_warnings(in_flags):
            warnings.filterwarnings("ignore", message="greedy decoding ignores")
            return model.generate(np.array([ids]), streamer=streamer, **kwargs)
    except InputError as exc:
        raise InputError(in_flags(str(exc))) from None


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt (or a tokenizer that adds nothing) starts from BOS."""
    ids = tokenizer.encode(prompt)
    if not prompt and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    if not ids:
        raise InputError("the prompt is empty and the tokenizer defines no BOS token to start from")
    return ids


def chat_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The conversation rendered by the model's chat template, ready for the assistant's turn,
    as ids; like transformers' ``apply_chat_template(tokenize=True)``, no special tokens are
    added on top of what the template writes."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def chat_stop_ids(model, tokenizer: Tokenizer) -> list[int]:
    """A reply ends at the model's stop ids or the tokenizer's EOS (a chat model's end-of-turn)."""
    stop = stop_ids_of(model)
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    return sorted(stop)


def adapter_base(adapter: str) -> str | None:
    """``base_model_name_or_path`` of the adapter's adapter_config.json, if it records one."""
    file = Path(adapter) / "adapter_config.json"
    if not file.is_file():
        return None  # the adapter loader says what is wrong with the folder
    value = read_json(file, "adapter config").get("base_model_name_or_path")
    return value if isinstance(value, str) and value else None


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def base_model_folder(args) -> str:
    """--model; else, with --adapter, the adapter's own base model when it is a local path
    (a hub id cannot be fetched here); else the bundled model."""
    base = adapter_base(args.adapter) if getattr(args, "adapter", None) else None
    if args.model is not None:
        if base is not None and not _same_path(args.model, base):
            say(f"minipeft: warning: --model {args.model} is not the model the adapter was trained on "
                f"({base}, base_model_name_or_path in {Path(args.adapter) / 'adapter_config.json'})")
        return args.model
    if base is not None and Path(base).expanduser().exists():
        say(f"base model: {base} (the adapter's base_model_name_or_path)")
        return str(Path(base).expanduser())
    if base is not None:
        say(f"minipeft: warning: the adapter's base model {base!r} is not a local folder; using the bundled "
            "model (pass --model)")
    return model_folder(args)


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
    proxy = proxy_model(args, folder) if hasattr(args, "proxy_expert") else None
    if proxy is not None:
        return proxy
    if args.adapter:
        from .merge import load_with_adapter  # noqa: PLC0415 - PEFT only when asked for

        return load_with_adapter(folder, args.adapter, args.device, rank=args.rank)
    if args.rank is not None:
        raise InputError("--rank needs --adapter (a DyLoRA adapter folder)")
    return LlamaForCausalLM.from_pretrained(folder, device=args.device)


def run(args) -> int:
    if args.system is not None and not args.chat:
        raise InputError("--system needs --chat")
    kwargs = decoding_kwargs(args)
    check_decoding(kwargs)
    folder = base_model_folder(args)
    model = load_model(args, folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    kwargs["tokenizer"] = tokenizer  # decodes for --stop
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        ids = chat_ids(tokenizer, messages + [{"role": "user", "content": args.prompt}])
        kwargs["eos_token_id"] = chat_stop_ids(getattr(model, "base", model), tokenizer)
        head = ""  # the reply alone: the rendered template is not the user's text
    else:
        ids, head = prompt_ids(tokenizer, args.prompt), args.prompt
    limit = getattr(model, "base", model).config.max_position_embeddings
    if len(ids) > limit:  # refused before anything is printed
        raise InputError(f"the {'chat-rendered ' if args.chat else ''}--prompt is {len(ids)} tokens, more than "
                         f"the model's max_position_embeddings ({limit})")
    start = time.perf_counter()
    if args.num_return_sequences == 1:  # one row: print it as it comes
        print(head, end="", flush=True)
        streamer = TextStream(tokenizer, ids)
        out = run_generation(model, ids, streamer, **kwargs)
        streamer.finish()
        print(flush=True)
    else:
        out = run_generation(model, ids, **kwargs)
        for row in out:
            print(head + continuation_text(tokenizer, ids, row[len(ids):].tolist()), flush=True)
    elapsed = time.perf_counter() - start
    count = int(out.shape[0] * (out.shape[1] - len(ids)))
    say(f"[{count} tokens in {elapsed:.2f} s, {count / max(elapsed, 1e-9):.1f} tokens/s]")
    return 0
