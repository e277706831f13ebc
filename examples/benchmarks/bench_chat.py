"""A scripted chat, with and without a PromptCache: the time to each reply's first token.

    python examples/benchmarks/bench_chat.py [--model DIR_OR_GGUF] [--max-new-tokens 64] [--rounds 2]

Four user turns (fixed text), greedy replies ended by the model's stop ids, the conversation
rendered by the chat template every turn as ``minipeft chat`` renders it. With the cache, a
turn runs the model on its new tokens; without, on the whole history again. Prints, per round
and way, the prompt length of each turn, the seconds to each reply's first token and the whole
chat's time, and checks that both ways gave the same replies. One BLAS thread.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import minipeft as mp  # noqa: E402
from minipeft.cli.generate import chat_ids, chat_stop_ids  # noqa: E402

USER_TURNS = ["Tell me a short story about a cat.", "Now make it about a dog.",
              "What is the capital of France?", "Summarize our conversation."]


class FirstToken:
    """A streamer that notes when the first new token arrives."""

    def __init__(self):
        self.asked, self.seconds = time.perf_counter(), None

    def __call__(self, _new_ids):
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.asked


def one_chat(model, tokenizer, max_new_tokens: int, cache):
    stop, messages, rows = chat_stop_ids(model, tokenizer), [], []
    start = time.perf_counter()
    for text in USER_TURNS:
        ids = chat_ids(tokenizer, messages + [{"role": "user", "content": text}])
        first = FirstToken()
        out = model.generate(np.array([ids]), max_new_tokens=max_new_tokens, eos_token_id=stop, prompt_cache=cache,
                             streamer=first)
        reply = tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        rows.append((len(ids), first.seconds, reply))
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.strip()}]
    return rows, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(mp.bundled_model_path()))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    model, tokenizer = mp.LlamaForCausalLM.from_pretrained(args.model), mp.Tokenizer.from_pretrained(args.model)
    print(f"{args.model}: {len(USER_TURNS)} turns, replies up to {args.max_new_tokens} tokens, "
          f"load average {os.getloadavg()[0]:.2f}")
    replies = {}
    for round_ in range(args.rounds):
        for way in ("cache", "fresh"):
            rows, total = one_chat(model, tokenizer, args.max_new_tokens, mp.PromptCache() if way == "cache" else None)
            replies.setdefault(way, [r for _, _, r in rows])
            lengths, firsts = " ".join(str(n) for n, _, _ in rows), " ".join(f"{s:.3f}" for _, s, _ in rows)
            print(f"round {round_ + 1} {way:5}: prompt tokens {lengths}; first token after {firsts} s; "
                  f"whole chat {total:.2f} s")
    print("same replies both ways:", replies["cache"] == replies["fresh"])


if __name__ == "__main__":
    main()
