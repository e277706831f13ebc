"""The contract every adapted layer keeps, and the pieces all PEFT methods share.

A method that adapts named layers (LoRA, DoRA, and later AdaLoRA, IA3 ...) replaces
each targeted layer by an :class:`AdapterLayer`: the original layer becomes its
``base_layer`` and the method's parameters live next to it in dicts keyed by
adapter name, so parameter names are PEFT's
(``...q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``).

The :class:`~minipeft.peft.peft_model.PeftModel` owns the adapter state and
pushes it into every layer: which adapters are active (``active_adapters``),
whether adapters are switched off (``disabled``), and during a mixed-adapter
batch the adapter of each row (``batch_adapters``). Merging is explicit
(:meth:`AdapterLayer.merge` / :meth:`AdapterLayer.unmerge`), never a side effect
of ``train()`` / ``eval()`` or of a forward pass.

:class:`ModulesToSaveWrapper` is PEFT's ``modules_to_save``: a module replaced by
the original (frozen) and one full trainable copy per adapter.
"""
from __future__ import annotations

import copy

import numpy as np

from ...autograd import ops
from ...autograd.tensor import Tensor
from ...backend import device_of, get_array_module, to_device
from ...nn import Module, Parameter
from .names import PREFIX

BASE_ROWS = "__base__"  # in ``adapter_names``: this row runs the base model, no adapter


class ParameterDict(Module):
    """Adapter name -> Parameter, walked like attributes, so a parameter is named
    ``lora_embedding_A.default`` (PEFT's ``nn.ParameterDict``)."""

    def __getitem__(self, name: str) -> Parameter:
        value = vars(self).get(name)
        if not isinstance(value, Parameter):
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: Parameter) -> None:
        setattr(self, name, value)

    def __delitem__(self, name: str) -> None:
        self[name]  # noqa: B018 - KeyError for a missing name
        delattr(self, name)

    def __contains__(self, name) -> bool:
        return isinstance(vars(self).get(name), Parameter)

    def keys(self) -> list[str]:
        return [k for k, v in vars(self).items() if isinstance(v, Parameter)]


class AdapterHolder(Module):
    """A module that holds named adapters' parameters: the contract PeftModel relies on.

    PeftModel finds every holder in the model (and its own prompt encoder), pushes its
    state into them (``active_adapters``, ``disabled``, ``batch_adapters``), collects
    their parameters (:meth:`adapter_state`) into groups and files, and deletes adapters
    through them. A file key is ``base_model.model.<path>.<key>`` unless
    :meth:`file_key` says otherwise (prompt tuning's ``prompt_embeddings``).
    """

    def __init__(self):
        self.active_adapters: list[str] = []
        self.disabled = False
        self.batch_adapters: list[str] | None = None  # one name per row during a mixed batch

    def adapter_names(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapter_state(self, name: str) -> dict[str, Parameter]:  # pragma: no cover - abstract
        """The adapter's parameters keyed as in its file, relative to this module."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def file_key(self, path: str, key: str) -> str:
        """The key of parameter ``key`` of this module (at ``path``) in an adapter file."""
        return f"{PREFIX}{path}.{key}"


class AdapterLayer(AdapterHolder):
    """A layer adapted by a PEFT method: ``base_layer`` plus named adapters.

    Subclasses define :meth:`adapter_names`, :meth:`adapter_state`,
    :meth:`delete_adapter`, what an adapter does to the layer's output
    (:meth:`adapter_forward`) or to its input (:meth:`adapter_input`, IA3 on a
    feed-forward layer) and, where a merge exists, :meth:`merge_into` /
    :meth:`unmerge_from` (pure functions of the weight array).
    """

    def __init__(self, base_layer: Module):
        super().__init__()
        self.base_layer = base_layer
        self.merged_adapters: list[str] = []  # in merge order; unmerged in reverse

    # ----- what subclasses provide -------------------------------------------------------
    def merge_into(self, name: str, weight):  # pragma: no cover - abstract
        """The base weight array with adapter ``name`` merged in (a new array)."""
        raise NotImplementedError(f"{type(self).__name__} has no merge")

    def unmerge_from(self, name: str, weight, keep: bool = False):  # pragma: no cover - abstract
        """The inverse of :meth:`merge_into`; ``keep`` keeps any cache the merge made."""
        raise NotImplementedError(f"{type(self).__name__} has no merge")

    def adapter_input(self, name: str, x):
        """The base layer's input with adapter ``name`` applied (default: unchanged)."""
        return x

    def adapter_forward(self, name: str, x, result):
        """The output with adapter ``name`` applied to ``result``, the output so far (default: unchanged)."""
        return result

    # ----- shared behaviour --------------------------------------------------------------
    def forward(self, x):
        if self.disabled:
            return self.base_layer(x)
        if self.batch_adapters is not None:
            return mixed_rows(self.batch_adapters, x, self._rows_forward)
        return self._run(self.unmerged_active(), x)

    def _run(self, names: list[str], x):
        """base(x with the input-side adapters applied), then the output-side adapters, in order."""
        inner = x
        for name in names:
            inner = self.adapter_input(name, inner)
        result = self.base_layer(inner)
        for name in names:
            result = self.adapter_forward(name, x, result)
        return result

    def _rows_forward(self, name: str, x):
        """The rows of a mixed batch that use adapter ``name`` (or none: ``"__base__"``)."""
        return self._run([name] if name in self.adapter_names() else [], x)

    def unmerged_active(self) -> list[str]:
        """Active adapters this layer holds that are not merged into its weight."""
        names = self.adapter_names()
        return [n for n in self.active_adapters if n in names and n not in self.merged_adapters]

    def merge(self, names: list[str], safe: bool = False) -> None:
        """Merge ``names`` (those this layer holds and has not merged) into the base weight.

        With ``safe`` a non-finite result raises ``ValueError`` and leaves the weight as it was.
        """
        weight = self.base_layer.weight
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names():
                continue  # merging twice is a no-op: merge is idempotent
            merged = self.merge_into(name, weight.data)
            if safe and not bool(get_array_module(merged).isfinite(merged).all()):
                self.unmerge_from(name, merged)  # drop any cache the merge made
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; it was not merged")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight, last merged first."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            weight.data = self.unmerge_from(self.merged_adapters.pop(), weight.data)

    def unmerged_base_weight(self):
        """The base weight without the merged adapters (no copy when none is merged)."""
        weight = self.base_layer.weight.data
        for name in reversed(self.merged_adapters):
            weight = self.unmerge_from(name, weight, keep=True)
        return weight


class ModulesToSaveWrapper(AdapterHolder):
    """PEFT's ``modules_to_save``: the frozen original plus one trainable copy per adapter.

    Forward runs the copy of the active adapter, or the original when adapters are
    disabled or the active adapter has no copy here. In memory the copy of adapter
    ``default`` is ``lm_head.modules_to_save.default.weight``; on disk ``lm_head.weight``.
    """

    def __init__(self, original_module: Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save: dict[str, Module] = {}

    def add(self, name: str) -> None:
        self.modules_to_save[name] = clone_module(self.original_module)

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_state(self, name: str) -> dict[str, Parameter]:
        return dict(self.modules_to_save[name].named_parameters())

    def delete_adapter(self, name: str) -> None:
        self.modules_to_save.pop(name, None)

    def module_for(self, name: str | None) -> Module:
        return self.modules_to_save.get(name, self.original_module) if name else self.original_module

    def forward(self, x, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.batch_adapters is not None:
            return mixed_rows(self.batch_adapters, x, lambda name, rows: self.module_for(name)(rows, *args, **kwargs))
        return self.module_for(next((n for n in self.active_adapters if n in self.modules_to_save), None))(
            x, *args, **kwargs)


# ----- helpers ---------------------------------------------------------------------------
def clone_module(module: Module) -> Module:
    """A deep copy whose Parameters are new (a tied weight becomes the copy's own)."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.grad = None
    return clone


def mixed_rows(names: list[str], x, run):
    """``run(name, x[rows])`` for each distinct name in ``names`` (one per row of ``x``),
    the outputs put back in row order. Differentiable: rows are picked and restored
    with indexing, whose backward scatters the gradient back."""
    device = device_of(x.data if isinstance(x, Tensor) else x)
    order, pieces = [], []
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        pieces.append(run(name, x[to_device(np.array(rows), device)]))
        order.extend(rows)
    out = pieces[0] if len(pieces) == 1 else ops.concat(pieces, axis=0)
    if order == sorted(order):
        return out
    return out[to_device(np.argsort(order), device)]


def layers_holding(model: Module, name: str, kind: type | tuple = AdapterHolder) -> list[tuple[str, Module]]:
    """(path, module) for every adapter holder of class ``kind`` in ``model`` (the bare model)
    that holds adapter ``name``, in model order: "the layers of adapter X", found one way."""
    from .targeting import candidate_modules  # noqa: PLC0415 - targeting builds on this module

    return [(path, m) for path, m in candidate_modules(model) if isinstance(m, kind) and name in m.adapter_names()]


def tied_uses(model: Module, path: str) -> list[str]:
    """Every attribute path holding the weight of the module at ``path`` (of its base layer when
    adapted); more than one means the weight is tied (input embedding and output head)."""
    module = model.get_submodule(path)
    weight = getattr(module, "base_layer", module).weight
    return parameter_holders(model).get(id(weight), [])


def refuse_tied(model: Module, paths, why: str) -> None:
    """ValueError naming the first of ``paths`` whose weight is tied: ``why`` would change every use."""
    for path in paths:
        if len(uses := tied_uses(model, path)) > 1:
            raise ValueError(f"{why} {path}.weight, which is tied to {uses}: it would change every one of them")


def parameter_holders(model: Module) -> dict[int, list[str]]:
    """id(Parameter) -> names of every module attribute holding it (tied weights have several)."""
    holders: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, Parameter):
                holders.setdefault(id(value), []).append(f"{mod_name}.{attr}" if mod_name else attr)
    return holders
