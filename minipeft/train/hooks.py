"""`TrainingHooks`: everything the trainer may call on a model beyond its forward, in one list.

The trainer needs only ``model(ids, attention_mask=, labels=)`` returning an object with
``.loss``. Anything more is optional and found once, by :meth:`TrainingHooks.of`: a field
holds the model's bound method (or generator) when the model has it, ``None`` when it does
not, and the trainer and the checkpoint code call the fields, never ``getattr`` by name.
:class:`~minipeft.peft.PeftModel` has all of them and forwards each to the methods of its
trainable adapters (core/method.py says which method uses which).

Order within one optimizer update (``step`` = updates already done, 0-based)::

    regularizer()                      per micro-batch, added to its loss before backward
    mask_gradients(step)               after the last backward, before clipping
    optimizer.step()
    on_step_end(step)
    edit_optimizer_state(step, optimizer)

Once per run: ``parameter_groups()`` when the Trainer is built (unless groups are given),
``calibrate(batches)`` before the first update of a fresh run (never on resume);
``save_pretrained`` / ``load_method_state`` / ``rng`` at every checkpoint save / resume.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

if TYPE_CHECKING:  # annotations only: no import cycle with the modules that use the hooks
    from pathlib import Path

    from ..autograd.tensor import Tensor
    from ..nn.groups import ParameterGroup
    from .batches import Batch
    from .optim import Optimizer


@dataclass(frozen=True)
class TrainingHooks:
    """The optional training hooks of one model; ``None`` where the model lacks one."""

    parameter_groups: Callable[[], list[ParameterGroup]] | None = None
    """``() -> [ParameterGroup]``: what to train, as named groups (each may set its own lr and
    weight decay). Called once, when the Trainer is built without ``parameter_groups=``;
    without it every parameter with ``requires_grad`` is trained as one group. A model that
    has it is an adapter model: checkpoints then also get an ``adapter/`` folder."""

    regularizer: Callable[[], Tensor | None] | None = None
    """``() -> Tensor | None``: a term added to every micro-batch's training loss before
    backward (AdaLoRA's orthogonality penalty); anything that is not a Tensor adds nothing."""

    mask_gradients: Callable[[int], None] | None = None
    """``(step) -> None``: after the update's last backward, before clipping and the optimizer
    step; edits ``p.grad`` in place (DyLoRA's frozen ranks, the selective methods' masks)."""

    calibrate: Callable[[Iterable[Batch]], None] | None = None
    """``(batches) -> None``: once, before the first update of a fresh run, never on resume
    (what it decides must come back through ``load_method_state``). ``batches`` is one pass
    over the training data in file order, ``batch_size`` examples at a time; it does not touch
    the training loader's generator. The model is in training mode; gradients it leaves
    behind are cleared before the first update."""

    on_step_end: Callable[[int], None] | None = None
    """``(step) -> None``: after the optimizer step (AdaLoRA's budget, DyLoRA's rank draw,
    ReLoRA's merge and re-init)."""

    edit_optimizer_state: Callable[[int, Optimizer], None] | None = None
    """``(step, optimizer) -> None``: after ``on_step_end``, with the trainer's optimizer
    (ReLoRA prunes the moments of its re-initialised factors, through ``Optimizer.state_for``)."""

    save_pretrained: Callable[[Path], None] | None = None
    """``(folder) -> None``: at every checkpoint of an adapter model (one with
    ``parameter_groups``), into ``checkpoint-N/adapter``: the adapter as of that step, for the user."""

    load_method_state: Callable[[Path], None] | None = None
    """``(folder) -> None``: on resume, with ``checkpoint-N/adapter``, after every checkpoint file has
    been checked and before the parameters are restored: state a method keeps outside its
    parameters (ReLoRA's merged updates, DyLoRA's rank)."""

    rng: np.random.Generator | None = None
    """The generator that draws the model's dropout masks (the one the model held when the hooks
    were built); checkpoints save and restore its ``bit_generator.state`` for a bit-identical
    resume. ``None`` when the model has no ``rng`` or it is not a NumPy Generator."""

    @classmethod
    def of(cls, model) -> TrainingHooks:
        """The hooks ``model`` has: its bound methods (callable attributes) and its generator."""
        found = {}
        for f in dataclasses.fields(cls):
            value = getattr(model, f.name, None)
            if f.name == "rng":
                found[f.name] = value if isinstance(value, np.random.Generator) else None
            else:
                found[f.name] = value if callable(value) else None
        return cls(**found)

