"""What the story examples share: the bundled model, its tokenizer and the Zoe stories.

Imported by the scripts next to it (``python examples/<script>.py`` puts this folder
on the import path).
"""
from __future__ import annotations

from pathlib import Path

import minipeft as mp
from minipeft.train import load_datasets

DATA = Path(__file__).parent / "data" / "zoe_stories.jsonl"


def bundled_model_and_stories(data: Path = DATA, seq_len: int = 256):
    """(base model, tokenizer, train set, eval set): 10% of the stories held out, seed 0."""
    path = mp.bundled_model_path()
    tok = mp.Tokenizer.from_pretrained(path)
    base = mp.LlamaForCausalLM.from_pretrained(path)
    train, evals = load_datasets(data, tok, seq_len=seq_len, eval_fraction=0.1, seed=0)
    return base, tok, train, evals
