"""Eval loss of a DyLoRA adapter at each of its ranks (peft/dylora.py): one trained adapter,
many adapters — the table shows what each rank b ≤ r_max is worth.

    losses = loss_per_rank(model, eval_data, range(1, 9))    # {1: 2.31, 2: 2.17, ...}
    print(format_rank_table(losses))
"""
from __future__ import annotations

import math

from ..peft.dylora import DyLoraConfig
from .trainer import evaluate


def loss_per_rank(model, data, ranks, batch_size: int = 8, adapter_name: str | None = None) -> dict[int, float]:
    """{b: token-weighted mean eval loss of ``model`` at rank b} (``evaluate``, eval mode).

    ``model`` is a PeftModel with a DyLoRA adapter; its eval rank is restored afterwards.
    """
    names = [adapter_name] if adapter_name else model.active_adapters
    before = {n: model.peft_config[n] for n in names if isinstance(model.peft_config.get(n), DyLoraConfig)}
    out = {}
    try:
        for b in ranks:
            model.set_rank(int(b), adapter_name)
            out[int(b)] = evaluate(model, data, batch_size)["eval_loss"]
    finally:
        for name, config in before.items():
            model.set_rank(config.eval_rank or config.r, name)
            model.peft_config[name] = config  # eval_rank None stays None
    return out


def format_rank_table(losses: dict[int, float]) -> str:
    """A two-column text table: rank, eval loss (and perplexity)."""
    lines = ["rank  eval loss  perplexity"]
    lines += [f"{b:>4}  {loss:9.4f}  {math.exp(loss):10.3f}" for b, loss in sorted(losses.items())]
    return "\n".join(lines)
