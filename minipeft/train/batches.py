"""Batches: right-padded arrays, and a seeded, resumable loader over epochs.

A batch of examples with lengths Tᵢ is padded on the right to T = max Tᵢ::

    input_ids[i, t]      = ids[t]  for t < Tᵢ,  pad id   after
    attention_mask[i, t] = 1       for t < Tᵢ,  0        after
    labels[i, t]         = labels  for t < Tᵢ,  −100     after

Right padding with a causal model leaves every real position's output unchanged, and
the −100 labels keep padding out of the loss. The pad id only has to be a valid id.

:class:`BatchLoader` walks the dataset in a fresh random order every epoch, drawn from a
NumPy Generator. Its cursor is (epoch, position in that epoch's order) plus the
Generator's state *at the start of the epoch*: restoring redraws the same order, so a
resumed run sees exactly the batches an uninterrupted run would. The last batch of an
epoch may be smaller (batches never straddle epochs).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ..autograd.fused import IGNORE_INDEX
from ..errors import CheckpointError
from .data import Dataset, Example


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64, 1 = real token
    labels: np.ndarray  # (B, T) int64, −100 = not learned

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens: what tokens/s counts."""
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        """Tokens the loss averages over: labels after the model's shift that are not −100."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad ``examples`` into one :class:`Batch`."""
    length = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), length), dtype=np.int64)
    labels = np.full((len(examples), length), IGNORE_INDEX, dtype=np.int64)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], mask[i, :n], labels[i, :n] = e.input_ids, 1, e.labels
    return Batch(ids, mask, labels)


def iter_batches(dataset: Dataset, batch_size: int):
    """The dataset in order, ``batch_size`` examples at a time (for evaluation)."""
    for begin in range(0, len(dataset), batch_size):
        yield collate(dataset.examples[begin:begin + batch_size], dataset.pad_id)


class BatchLoader:
    """Endless training batches, reshuffled every epoch from ``rng``; checkpointable."""

    def __init__(self, dataset: Dataset, batch_size: int, rng: np.random.Generator, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError(f"{dataset.name or 'the dataset'} has no examples")
        self.dataset, self.batch_size, self.rng, self.shuffle = dataset, batch_size, rng, shuffle
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None  # this epoch's order, drawn lazily
        self._epoch_rng_state: dict | None = None  # rng state before drawing that order

    def _draw_order(self) -> None:
        self._epoch_rng_state = copy.deepcopy(self.rng.bit_generator.state)
        n = len(self.dataset)
        self._order = self.rng.permutation(n) if self.shuffle else np.arange(n)

    def next_batch(self) -> Batch:
        if self._order is None:
            self._draw_order()
        if self.position >= len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
            self._draw_order()
        index = self._order[self.position:self.position + self.batch_size]
        self.position += len(index)
        return collate([self.dataset.examples[i] for i in index], self.dataset.pad_id)

    def state_dict(self) -> dict:
        state = self._epoch_rng_state if self._order is not None else self.rng.bit_generator.state
        return {"epoch": self.epoch, "position": self.position, "num_examples": len(self.dataset),
                "rng_state": copy.deepcopy(state)}

    def load_state_dict(self, state: dict, source: str = "data cursor") -> None:
        n = len(self.dataset)
        if state.get("num_examples") != n:
            raise CheckpointError(f"{source}: the checkpoint was made with {state.get('num_examples')!r} "
                                  f"training examples, this run has {n}; resume with the same data")
        epoch, position = state.get("epoch"), state.get("position")
        for name, value in (("epoch", epoch), ("position", position)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"{source}: {name} must be an integer >= 0, got {value!r}")
        if position > n:
            raise CheckpointError(f"{source}: position {position} is past the {n} examples")
        try:
            self.rng.bit_generator.state = copy.deepcopy(state.get("rng_state"))
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{source}: rng_state does not fit a "
                                  f"{type(self.rng.bit_generator).__name__} generator ({exc})") from None
        self._draw_order()  # the same order as before the interruption, rng back where it was
        self.epoch, self.position = epoch, position
