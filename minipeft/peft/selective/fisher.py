"""The calibration pass of the selective methods: empirical Fisher scores of the targeted weights,
and the masks chosen from them.

For a targeted weight W (out, in) and the training loss L (the model's mean cross-entropy over
the target tokens, labels taken from the data: the *empirical* Fisher, "label" mode in FISH):

    FishMask (Sung et al., 2021, FISH run_glue_sparse_update.py):  batch size 1,
        F = Σ_{n ≤ N} (∂L_n/∂W)²          (or |∂L_n/∂W| with mask_method "label-absolute")
        over the first N = num_samples examples (one example at a time, rows of padding removed).
    Child-tuning D (Xu et al., 2021, ChildTuningD.py calculate_fisher):  training batches b = 1..B,
        g_b = ∂L_b/∂W · min(1, c / (‖∂L_b/∂W‖ + 1e-6))   per-tensor clipping, c = max_grad_norm (1.0)
        F = (1/B) Σ_b g_b²

Gradients with respect to W itself are needed although W is frozen: the pass switches
``requires_grad`` on for exactly the targeted weights and gives every flag back afterwards
(``peft_model.sync()``). ∂L/∂W = ∂L/∂(W + ΔW), so an adapter's current ΔW is part of the model.

Selection: one global ranking over all targeted weights of the adapter (their W.reshape(-1)
concatenated in model order). :func:`top_k` keeps the k largest scores; among equal scores at
the cut the lower global index wins (NumPy's partition + a stable pick, deterministic; FISH's
``torch.topk`` leaves tie order unspecified).
"""
from __future__ import annotations

import math
import sys

import numpy as np

from ...backend import get_array_module, to_numpy
from ...errors import DataError

IGNORE_INDEX = -100


def examples_of(batches, limit: int | None = None):
    """(input_ids, attention_mask, labels), each (1, n), one example at a time, padding removed;
    rows without a target token are skipped (their loss is undefined). Stops after ``limit``."""
    taken = 0
    for batch in batches:
        for i in range(len(batch.input_ids)):
            if limit is not None and taken >= limit:
                return
            n = int(np.asarray(batch.attention_mask[i]).sum())
            labels = np.asarray(batch.labels[i:i + 1, :n])
            if not (labels[:, 1:] != IGNORE_INDEX).any():
                continue
            taken += 1
            yield batch.input_ids[i:i + 1, :n], batch.attention_mask[i:i + 1, :n], labels


def whole_batches(batches):
    for batch in batches:
        if (np.asarray(batch.labels)[:, 1:] != IGNORE_INDEX).any():
            yield batch.input_ids, batch.attention_mask, batch.labels


def fisher_scores(peft_model, weights, units, *, max_grad_norm: float | None = None, square: bool = True,
                  progress_total: int | None = None) -> tuple[list, int]:
    """(Σ over ``units`` of each weight's squared (or absolute) gradient, number of units).

    ``units`` yields (input_ids, attention_mask, labels) per backward pass (one example, or one
    batch); ``max_grad_norm`` clips each tensor's gradient to that norm first (Child-tuning D).
    ``progress_total``: show a tqdm bar over that many units when stderr is a terminal."""
    xp = get_array_module(weights[0].data)
    scores = [xp.zeros(w.shape, dtype=np.result_type(w.dtype, np.float32)) for w in weights]
    count, bar = 0, _bar(progress_total)
    try:
        for p in peft_model.parameters():
            p.requires_grad = False
        for w in weights:
            w.requires_grad = True
        for ids, mask, labels in units:
            for w in weights:
                w.grad = None
            loss = peft_model(ids, attention_mask=mask, labels=labels).loss
            if not math.isfinite(float(loss.item())):
                raise DataError(f"calibration: the loss of unit {count} is {float(loss.item())}; "
                                "Fisher scores need finite gradients")
            loss.backward()
            for s, w in zip(scores, weights):
                if w.grad is None:  # a weight this unit never reached
                    continue
                g = w.grad.astype(s.dtype, copy=False)
                if max_grad_norm is not None:  # torch.nn.utils.clip_grad_norm_ on this one tensor
                    g = g * min(1.0, max_grad_norm / (float(xp.sqrt((g * g).sum())) + 1e-6))
                s += g * g if square else xp.abs(g)
            count += 1
            bar.update(1)
    finally:
        bar.close()
        for w in weights:
            w.grad = None
        peft_model.sync()  # every requires_grad flag back as the adapter state says
    if count == 0:
        raise DataError("calibration: the data holds no example with a target token, so no Fisher score")
    return scores, count


def top_k(scores: list, k: int) -> np.ndarray:
    """Sorted global flat indices of the k largest scores over all tensors (ties: lower index)."""
    flat = np.concatenate([to_numpy(s).reshape(-1) for s in scores])
    if not np.all(np.isfinite(flat)):
        raise DataError("calibration: a Fisher score is not finite")
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= flat.size:
        return np.arange(flat.size, dtype=np.int64)
    cut = np.partition(flat, flat.size - k)[flat.size - k]  # the k-th largest score
    above = np.flatnonzero(flat > cut)
    ties = np.flatnonzero(flat == cut)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)


def percentile_count(n: int, p: float) -> int:
    """How many of n distinct scores satisfy the authors' rule F ≥ np.percentile(F, (1 − p)·100):
    n − ⌈h⌉ with h = (1 − p)(n − 1), NumPy's linear-interpolation position (q/100 · (n − 1))."""
    h = (((1.0 - p) * 100) / 100) * (n - 1)
    return n - math.ceil(h)


def _bar(total):
    class _Off:
        def update(self, _):
            pass

        def close(self):
            pass

    if total is None or not sys.stderr.isatty():
        return _Off()
    from tqdm import tqdm  # noqa: PLC0415 - only a terminal run draws it

    return tqdm(total=total, file=sys.stderr, desc="fisher", unit="example", dynamic_ncols=True)
