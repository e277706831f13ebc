"""Evaluation: the token-weighted mean loss and perplexity of a model on a dataset.

    L = Σ_b n_b·CE_b / Σ_b n_b      (n_b target tokens of batch b),   perplexity = exp(L)
"""
from __future__ import annotations

import math

from ..autograd.tensor import no_grad
from .batches import iter_batches
from .data import Dataset


def evaluate(model, data: Dataset, batch_size: int = 8) -> dict:
    """Token-weighted mean loss and perplexity of ``model`` on ``data``, without gradients."""
    was_training = getattr(model, "training", True)
    model.eval()
    total, count = 0.0, 0
    try:
        with no_grad():
            for batch in iter_batches(data, batch_size):
                n = batch.num_targets
                if n:
                    out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
                    total, count = total + float(out.loss.item()) * n, count + n
    finally:
        model.train(was_training)
    loss = total / count if count else math.nan
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return {"eval_loss": loss, "eval_ppl": ppl, "eval_tokens": count}
