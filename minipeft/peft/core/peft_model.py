"""`PeftModel`: a model with named PEFT adapters, in Hugging Face PEFT's shape.

``get_peft_model(model, config)`` adapts a :class:`~minipeft.LlamaForCausalLM` in
place and wraps it as PEFT does: ``peft_model.base_model.model`` is the model, so
parameter names are PEFT's (``base_model.model.model.layers.0.self_attn.q_proj.
lora_A.default.weight``; the frozen weight at ``...q_proj.base_layer.weight``) and
``save_pretrained`` writes files PEFT reads (saving.py).

Which adapters run and which train is an :class:`AdapterState`, owned here and changed
only through its methods; :meth:`PeftModel.sync` pushes it into every adapter holder
(core/base.py) and sets ``requires_grad`` to match. Every base parameter is frozen
(``requires_grad=False``, so the engine skips its weight-gradient matmuls); the
trainable parameters are returned as explicit groups by :meth:`parameter_groups`
(``lora:default``, ``modules_to_save:default``, ``bias:default``). Adding, switching,
deleting, disabling and merging adapters is in adapters.py.

The forward runs the adapted model; the methods that add virtual tokens (prompt and
prefix tuning) are plumbed in by virtual_tokens.py, and :meth:`PeftModel.generate` runs the
adapted model too, so they are never dropped at generation.

Training hooks the trainer calls by name (train/hooks.py lists them): :meth:`regularizer`,
:meth:`mask_gradients`, :meth:`calibrate`, :meth:`on_step_end`, :meth:`edit_optimizer_state`
(each delegates to the methods of the trainable adapters), :meth:`load_method_state` (on
resume: state a method keeps outside its parameters), and the generator :attr:`rng` that
draws adapter initialisations and then every dropout mask (save and restore
``rng.bit_generator.state`` for a bit-identical resume).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...autograd.tensor import Tensor
from ...backend import random_generator
from ...nn import Module, Parameter, ParameterGroup
from . import adapters, registry, saving, targeting, virtual_tokens
from .base import BASE_ROWS, AdapterHolder, AdapterLayer, ModulesToSaveWrapper, layers_holding
from .config import PeftConfig
from .names import adapter_folder


@dataclass
class AdapterState:
    """Which adapters run (``active``, in order), which of those stay frozen (loaded for
    inference), and whether adapters are switched off altogether."""

    active: list[str]
    frozen: set[str] = field(default_factory=set)
    disabled: bool = False

    def activate(self, names: list[str], inference_mode: bool) -> None:
        self.active = list(names)
        if inference_mode:
            self.frozen.update(names)
        else:
            self.frozen.difference_update(names)

    def freeze(self, name: str) -> None:
        self.frozen.add(name)

    def forget(self, name: str, remaining: list[str]) -> None:
        """Adapter ``name`` is gone; if it was active, the first of ``remaining`` runs instead."""
        self.frozen.discard(name)
        self.active = [n for n in self.active if n != name] or remaining[:1]

    def clear(self) -> None:
        self.active, self.frozen, self.disabled = [], set(), False


class TunerModel(Module):
    """PEFT's tuner (``LoraModel``): holds the adapted model as ``.model``, hence the
    ``base_model.model.`` prefix of every parameter name."""

    def __init__(self, model: Module):
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(Module):
    """A model adapted by one or more named PEFT adapters; call it like the model itself."""

    def __init__(self, model: Module, config: PeftConfig, adapter_name: str = "default", seed=0,
                 _for_loading: bool = False):
        if isinstance(model, PeftModel):
            raise TypeError("the model is already a PeftModel; use add_adapter to add another adapter")
        self.base_model = TunerModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.state = AdapterState([adapter_name])
        self._rng = random_generator(seed)
        adapters.inject(self, adapter_name, config, for_loading=_for_loading)
        self.sync()  # freezes the base model

    def __getattr__(self, name):
        """Attributes of the wrapped model (``config``, ``generation_config``, ...), as in PEFT."""
        if name.startswith("_") or "base_model" not in vars(self):
            raise AttributeError(name)
        return getattr(vars(self)["base_model"].model, name)

    # ----- what the trainer sees ----------------------------------------------------------
    @property
    def rng(self) -> np.random.Generator:
        """Draws adapter inits, then the dropout masks of every adapter layer."""
        return self._rng

    @rng.setter
    def rng(self, generator: np.random.Generator) -> None:
        self._rng = generator
        for module in self.adapter_modules():
            if hasattr(module, "rng"):
                module.rng = generator

    def get_base_model(self) -> Module:
        """The adapted model itself (adapter layers inside)."""
        return self.base_model.model

    @property
    def active_adapter(self) -> str | None:
        return self.state.active[0] if self.state.active else None

    @property
    def active_adapters(self) -> list[str]:
        return list(self.state.active)

    def forward(self, input_ids=None, attention_mask=None, labels=None, adapter_names=None, **kwargs):
        """The adapted model's forward (see the module docstring for virtual tokens);
        ``adapter_names`` (one per row, ``"__base__"`` for no adapter) runs a mixed-adapter
        batch (inference only, as in PEFT)."""
        model = self.base_model.model
        if adapter_names is None:
            virtual = self.virtual_token_adapter()
            if virtual is not None:
                return virtual_tokens.forward_with_virtual_tokens(self, *virtual, input_ids, attention_mask,
                                                                  labels, **kwargs)
            return model(input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        rows = len(kwargs["inputs_embeds"]) if input_ids is None else len(input_ids)
        self._check_mixed_batch(list(adapter_names), rows)
        modules = self.adapter_modules()
        for module in modules:
            module.batch_adapters = list(adapter_names)
        try:
            return model(input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            for module in modules:
                module.batch_adapters = None

    def generate(self, input_ids, **kwargs) -> np.ndarray:
        """Generate with the adapted model (virtual tokens included); the arguments of
        :func:`minipeft.models.generation.generate`."""
        from ...models.generation import generate  # noqa: PLC0415 - generation imports the model package

        return generate(self, input_ids, **kwargs)

    def virtual_token_adapter(self):
        """(method, name) of the active adapter that adds virtual tokens, or None (virtual_tokens.py)."""
        return virtual_tokens.virtual_token_adapter(self)

    def _check_mixed_batch(self, names: list[str], rows: int) -> None:
        if len(names) != rows:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {rows} rows")
        if self.training:
            raise ValueError("adapter_names (a mixed-adapter batch) is for inference: call model.eval() first")
        unknown = sorted({n for n in names if n != BASE_ROWS} - set(self.peft_config))
        if unknown:
            raise ValueError(f"adapter_names names adapters that do not exist: {unknown}")
        if any(m.merged_adapters for m in self.adapter_modules() if isinstance(m, AdapterLayer)):
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        dora = sorted({n for n in names if getattr(self.peft_config.get(n), "use_dora", False)})
        if dora:
            raise ValueError(f"adapter_names cannot use DoRA adapters (as in PEFT): {dora}")
        virtual = sorted({n for n in names if n in self.peft_config and (
            (m := registry.get_method(self.peft_config[n].peft_type)).prompt_embeddings or m.prefix_key_values)})
        if virtual:
            raise ValueError(f"adapter_names cannot use adapters that add virtual tokens: {virtual}")

    def parameter_groups(self) -> list[ParameterGroup]:
        """The trainable parameters, one explicit group per method and adapter."""
        groups, seen = [], set()

        def add(name, params):
            params = [p for p in params if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append(ParameterGroup(name, params))

        for name in self.trainable_adapters():
            method = registry.get_method(self.peft_config[name].peft_type)
            add(f"{method.group_prefix}:{name}", self._adapter_params(name, method.layer_cls))
            add(f"modules_to_save:{name}", self._adapter_params(name, ModulesToSaveWrapper))
            add(f"bias:{name}", self.bias_parameters(name))
        return groups

    def regularizer(self) -> Tensor | None:
        """Σ of the trainable adapters' regularisers (to add to the loss), None when none has one."""
        terms = [t for t in self._call_hooks("regularizer") if t is not None]
        return None if not terms else sum(terms[1:], terms[0])

    def mask_gradients(self, step: int) -> None:
        """After backward, before the optimizer step: methods that mask gradients do it here."""
        self._call_hooks("mask_gradients", step)

    def calibrate(self, batches) -> None:
        """Before the first step of a fresh run: methods that choose what to train from data
        (Fisher scores) read ``batches`` (an iterable of training batches) here."""
        self._call_hooks("calibrate", batches)

    def on_step_end(self, step: int) -> None:
        """After the optimizer step: methods with a schedule (AdaLoRA's budget ...) act here."""
        self._call_hooks("on_step_end", step)

    def edit_optimizer_state(self, step: int, optimizer) -> None:
        """After on_step_end, with the trainer's optimizer: ReLoRA prunes its moments at a restart."""
        self._call_hooks("edit_optimizer_state", step, optimizer)

    def load_method_state(self, folder) -> None:
        """Read what ``save_pretrained(folder)`` wrote beyond the parameters (ReLoRA's merged
        updates, DyLoRA's training rank); the trainer calls it when it resumes a checkpoint."""
        for name, config in self.peft_config.items():
            load_extra = registry.get_method(config.peft_type).load_extra
            if load_extra is not None:
                load_extra(self, name, adapter_folder(folder, name))

    def set_rank(self, rank: int, adapter_name: str | None = None) -> None:
        """DyLoRA: evaluate, merge and save the active DyLoRA adapter(s) at rank ``rank``."""
        from ..lowrank.dylora import set_rank  # noqa: PLC0415 - a DyLoRA-only method

        set_rank(self, rank, adapter_name)

    def _call_hooks(self, hook: str, *args) -> list:
        out = []
        for name in self.trainable_adapters():
            fn = getattr(registry.get_method(self.peft_config[name].peft_type), hook)
            if fn is not None:
                out.append(fn(self, name, *args))
        return out

    # ----- counting (PEFT's get_nb_trainable_parameters / print line) -------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters; a tied weight counts once, adapters are included."""
        trainable = total = 0
        for _, p in self.named_parameters():
            total += int(p.size)
            trainable += int(p.size) if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line, e.g. ``trainable params: 8,960 || all params: 268,992 || trainable%: 3.3310``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ----- adapters: see adapters.py ------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add a new adapter (not activated: call set_adapter), as PEFT."""
        adapters.add_adapter(self, adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or a list of names) active, and trainable unless ``inference_mode``."""
        adapters.set_adapter(self, adapter_name, inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        adapters.delete_adapter(self, adapter_name)

    def disable_adapter(self):
        """Context manager: inside it the model computes the base model's function."""
        return adapters.disable_adapter(self)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the active adapters (or ``adapter_names``) into the base weights."""
        adapters.merge_adapter(self, adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        adapters.unmerge_adapter(self)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> Module:
        """Merge, remove every adapter layer and return the plain model (``progressbar`` is ignored)."""
        return adapters.unload(self, merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> Module:
        """Remove every adapter layer without merging and return the original base model."""
        return adapters.unload(self, merge=False)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True) -> None:
        """A new adapter combining others; see :func:`minipeft.peft.combine.add_weighted_adapter`."""
        from ..lowrank.combine import add_weighted_adapter  # noqa: PLC0415 - combine builds on this module

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type=combination_type,
                             svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices)

    # ----- files: see saving.py -------------------------------------------------------------
    def save_pretrained(self, save_directory, selected_adapters: list[str] | None = None,
                        save_embedding_layers: bool | str = "auto") -> None:
        """Write PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter
        (adapters other than ``default`` in a sub-folder of their name, as PEFT)."""
        saving.save_pretrained(self, save_directory, selected_adapters, save_embedding_layers)

    @classmethod
    def from_pretrained(cls, model: Module, model_id, adapter_name: str = "default",
                        is_trainable: bool = False, seed=0) -> "PeftModel":
        """Load an adapter folder written by PEFT or minipeft onto ``model``."""
        config = saving.read_config(model_id).replace(inference_mode=not is_trainable)
        peft_model = cls(model, config, adapter_name=adapter_name, seed=seed, _for_loading=True)
        saving.load_weights(peft_model, model_id, adapter_name)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False) -> None:
        """Load another adapter folder under ``adapter_name`` (not activated, as PEFT)."""
        config = saving.read_config(model_id).replace(inference_mode=not is_trainable)
        adapters.add_adapter(self, adapter_name, config, for_loading=True)
        saving.load_weights(self, model_id, adapter_name)
        if not is_trainable:
            self.eval()

    # ----- what adapters.py, saving.py and the methods read ------------------------------
    def adapter_modules(self) -> list[Module]:
        """Every adapter holder of the model (adapter layers, modules_to_save wrappers, ...)."""
        return [m for _, m in self.named_adapter_modules()]

    def named_adapter_modules(self) -> list[tuple[str, Module]]:
        return [(n, m) for n, m in targeting.candidate_modules(self.base_model.model) if isinstance(m, AdapterHolder)]

    def adapter_layers(self, name: str, kind: type | tuple = AdapterHolder) -> list[tuple[str, Module]]:
        """(path, holder) for the holders of class ``kind`` that hold adapter ``name``, in model order."""
        return layers_holding(self.base_model.model, name, kind)

    def trainable_adapters(self) -> list[str]:
        if self.state.disabled:
            return []
        return [n for n in self.state.active if n in self.peft_config and n not in self.state.frozen]

    def _adapter_params(self, name: str, kind: type) -> list:
        return [p for _, m in self.adapter_layers(name, kind) for p in m.adapter_state(name).values()]

    def bias_parameters(self, name: str) -> list:
        """The biases adapter ``name`` trains: every base bias ("all") or those of its layers ("lora_only",
        BitFit's "beft_only")."""
        bias = getattr(self.peft_config[name], "bias", "none")
        if bias == "all":
            owned = {id(p) for m in self.adapter_modules() for n in m.adapter_names()
                     for p in m.adapter_state(n).values()}
            return [p for n, p in self.base_model.model.named_parameters()
                    if n.endswith(".bias") and id(p) not in owned]
        if bias in ("lora_only", "beft_only"):  # a bias merging created (BitFit) is no Parameter: not trained
            return [m.base_layer.bias for m in self.adapter_modules() if isinstance(m, AdapterLayer)
                    and name in m.adapter_names() and isinstance(getattr(m.base_layer, "bias", None), Parameter)]
        return []

    def sync(self) -> None:
        """Push :attr:`state` into every adapter holder and set ``requires_grad`` to match it."""
        for p in self.parameters():
            p.requires_grad = False
        trainable = self.trainable_adapters()
        for module in self.adapter_modules():
            module.active_adapters = [n for n in self.state.active if n in self.peft_config]
            module.disabled = self.state.disabled
            for name in trainable:
                if name in module.adapter_names():
                    for p in module.adapter_state(name).values():
                        p.requires_grad = True
        for name in trainable:
            for p in self.bias_parameters(name):
                p.requires_grad = True


def get_peft_model(model: Module, peft_config: PeftConfig, adapter_name: str = "default", seed=0) -> PeftModel:
    """Adapt ``model`` in place with ``peft_config`` and return it wrapped as a :class:`PeftModel`.

    ``seed`` seeds :attr:`PeftModel.rng` (adapter initialisation, then dropout masks).
    """
    return PeftModel(model, peft_config, adapter_name=adapter_name, seed=seed)
