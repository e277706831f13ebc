"""What the story examples share: the bundled model, its tokenizer and the Zoe stories.

Imported by the scripts next to it (``python examples/<script>.py`` puts this folder
on the import path).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import minipeft as mp
from minipeft.train import evaluate, load_datasets

DATA = Path(__file__).parent / "data" / "zoe_stories.jsonl"


def bundled_model_and_stories(data: Path = DATA, seq_len: int = 256):
    """(base model, tokenizer, train set, eval set): 10% of the stories held out, seed 0."""
    path = mp.bundled_model_path()
    tok = mp.Tokenizer.from_pretrained(path)
    base = mp.LlamaForCausalLM.from_pretrained(path)
    train, evals = load_datasets(data, tok, seq_len=seq_len, eval_fraction=0.1, seed=0)
    return base, tok, train, evals


def sample_stories(model, tok, n=24, seed=0):
    """n stories from BOS (temperature 0.8), and the greedy one."""
    with mp.no_grad():
        greedy = model.generate(np.array([[tok.bos_token_id]]), max_new_tokens=60)
        sampled = model.generate(np.full((n, 1), tok.bos_token_id), max_new_tokens=80, temperature=0.8, seed=seed)
    return tok.decode(greedy[0].tolist()), [tok.decode(row.tolist()) for row in sampled]


def report(title, model, tok, evals):
    metrics = evaluate(model, evals, batch_size=8)
    greedy, stories = sample_stories(model, tok)
    lily = sum("Lily" in s for s in stories)
    zoe = sum("Zoe" in s for s in stories)
    print(f"\n== {title} ==")
    print(f"eval loss {metrics['eval_loss']:.4f}  perplexity {metrics['eval_ppl']:.3f}")
    print(f"greedy: {greedy}")
    print(f"{len(stories)} sampled stories: {lily} mention Lily, {zoe} mention Zoe")
    return {**metrics, "lily": lily, "zoe": zoe, "stories": len(stories)}
