"""``minipeft chat``: talk with a model (and adapter) in a loop, its replies printed as they come.

Each line read from stdin is one user message; the whole conversation so far is
rendered with the model's chat template (``Tokenizer.apply_chat_template``, with the
generation prompt) and the reply is generated from it, streamed to stdout as it is
decoded, and kept in the history as the assistant's message. The keys and values of the
conversation stay in a :class:`~minipeft.models.prompt_cache.PromptCache` between turns, as
llama.cpp's ``llama-cli`` keeps its cache: a turn runs the model on the tokens that are new
(the user's message, and whatever of the last reply the template renders differently), not on
the whole history again. Proxy-tuning and adapters with virtual tokens (prompt / prefix tuning)
re-read the history every turn.

Commands: ``/reset`` clears the history (the ``--system`` message stays), ``/exit`` or
end of input (Ctrl-D) ends, Ctrl-C during a reply stops that reply and forgets its turn.
Replies go to stdout, one per turn, each ending with a newline; everything else (the
greeting, notices, warnings) goes to stderr, so ``echo "Hi" | minipeft chat > out.txt``
captures the replies alone. A conversation that no longer fits the model's
``max_position_embeddings`` is not sent: the user is told to ``/reset``.
"""
from __future__ import annotations

import sys

from ..errors import InputError
from ..io.tokenizer import Tokenizer
from ..models import PromptCache
from ..models.prompt_cache import serves
from .common import add_model_option, say
from .generate import (add_adapter_options, add_sampling_options, base_model_folder, chat_ids, chat_stop_ids,
                       check_decoding, decoding_kwargs, load_model, run_generation)
from .streaming import TextStream, one_line_warnings

COMMANDS = "/reset clears the history, /exit or Ctrl-D ends"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in a loop (stdin lines in, streamed replies out)")
    add_model_option(p)
    add_adapter_options(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message at the start of the chat")
    add_sampling_options(p, max_new_tokens=256)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.num_return_sequences != 1:
        raise InputError("--num-return-sequences must be 1 in a chat: one reply per turn")
    kwargs = decoding_kwargs(args)
    check_decoding(kwargs)
    folder = base_model_folder(args)
    model = load_model(args, folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    kwargs["tokenizer"] = tokenizer  # decodes for --stop
    kwargs["eos_token_id"] = chat_stop_ids(model, tokenizer)
    limit = model.config.max_position_embeddings
    if serves(model):
        kwargs["prompt_cache"] = PromptCache()
    start = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages = list(start)
    say(f"chatting with {folder}{' + ' + args.adapter if args.adapter else ''}; {COMMANDS}")
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(start)
            say("(history cleared)")
            continue
        if not text.strip():
            continue
        with one_line_warnings():  # e.g. the tokenizer's note that it uses a default template
            ids = chat_ids(tokenizer, messages + [{"role": "user", "content": text}])
        if len(ids) >= limit:
            say(f"(the conversation is {len(ids)} tokens, the model reads at most {limit}: not sent; "
                "/reset to start over)")
            continue
        streamer = TextStream(tokenizer, ids)
        try:
            run_generation(model, ids, streamer, **kwargs)
        except KeyboardInterrupt:
            print(flush=True)
            say("(reply interrupted and forgotten)")
            continue
        reply = streamer.finish()
        print(flush=True)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.strip()}]
    return 0
