"""`Module` and `Parameter`: containers that find their parameters by walking attributes.

A Module's parameters are the Parameters among its attributes, then those of
its sub-modules (attributes that are Modules, or lists of Modules), in the
order the attributes were assigned. The dotted attribute path of a parameter
is its name, e.g. ``model.layers.0.self_attn.q_proj.weight``: the same key a
Hugging Face safetensors file uses, so loading a checkpoint is an identity map.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..autograd.tensor import Tensor
from ..backend import to_device, to_numpy
from ..errors import CheckpointError


class Parameter(Tensor):
    """A leaf Tensor that belongs to a Module; trainable unless told otherwise."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


class Module:
    """Base class of layers and models."""

    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    # ----- walking ---------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        """Direct sub-modules: Module attributes, lists of Modules (``name.0``) and
        dicts of Modules (``name.key``, e.g. PEFT's ``lora_A.default``)."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                for i, child in enumerate(value):
                    yield f"{name}.{i}", child
            elif isinstance(value, dict) and value and all(isinstance(v, Module) for v in value.values()):
                for key, child in value.items():
                    yield f"{name}.{key}", child

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """This module (name ``prefix``) and every sub-module, depth first, once each."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module.named_children()]
            stack.extend(reversed(children))

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) pairs; a shared (tied) Parameter appears once, first name wins."""
        seen = set()
        for mod_name, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{mod_name}.{name}" if mod_name else name), value

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def get_submodule(self, path: str) -> "Module":
        """The module at a dotted path (list items by index, dict items by key)."""
        module = self
        for part in path.split(".") if path else []:
            if isinstance(module, (list, tuple)):
                module = module[int(part)]
            elif isinstance(module, dict):
                module = module[part]
            else:
                module = getattr(module, part)
        return module

    def set_submodule(self, path: str, new: "Module") -> None:
        """Replace the module at a dotted path (how PEFT methods wrap a layer)."""
        parent_path, _, last = path.rpartition(".")
        parent = self.get_submodule(parent_path)
        if isinstance(parent, list):
            parent[int(last)] = new
        elif isinstance(parent, dict):
            parent[last] = new
        else:
            setattr(parent, last, new)

    # ----- modes and devices -----------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device: str | None = None, dtype=None) -> "Module":
        """Move every parameter (in place) to ``device`` and/or cast it to ``dtype``.

        An array already on ``device`` with ``dtype`` is kept, not copied: a model loaded
        from a memory-mapped file stays a view of it (frozen weights are never copied)."""
        for p in self.parameters():
            data = p.data if device is None else to_device(p.data, device)
            p.data = data if dtype is None else data.astype(dtype, copy=False)
            p.grad = None
        return self

    @property
    def device(self) -> str:
        """Where the first parameter lives (all of them, after ``to``); stops at the first."""
        first = next(self.named_parameters(), None)
        return first[1].device if first else "cpu"

    # ----- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter by name (tied parameters once)."""
        return {name: np.array(to_numpy(p.data), copy=True) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True, source: str = "state dict") -> None:
        """Set parameters from arrays by name, checking keys and shapes first.

        An array that already has the parameter's dtype (and device) becomes its data
        without a copy (so a model can hold views of a memory-mapped file); any other
        is converted once. With ``strict`` every parameter must be present and nothing
        else may be. All problems are reported together, naming ``source`` (e.g. the file),
        and nothing is changed unless every check passes.
        """
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        wrong = [
            f"{k}: expected shape {tuple(params[k].shape)}, found {tuple(np.shape(state[k]))}"
            for k in params
            if k in state and tuple(np.shape(state[k])) != tuple(params[k].shape)
        ]
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if wrong:
            problems.append("wrong shapes: " + "; ".join(wrong))
        if problems:
            raise CheckpointError(f"{source} does not fit the model: " + " | ".join(problems))
        for name, p in params.items():
            if name in state:
                array = state[name]
                p.data = to_device(np.asarray(to_numpy(array), dtype=p.data.dtype), p.device)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(int(p.size) for p in self.parameters() if p.requires_grad or not trainable_only)


class ModuleList(list):
    """A list of Modules; Module walks plain lists too, this only names the intent."""
