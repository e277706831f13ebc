"""Adding, switching, deleting, disabling, merging and unloading the adapters of a PeftModel.

Functions of a :class:`~minipeft.peft.peft_model.PeftModel` (whose methods call them),
each a small explicit change of ``peft_model.state`` (through its methods) followed by
``peft_model.sync()``. Semantics are
Hugging Face PEFT's (REFERENCE 1.2) unless a docstring says otherwise.
"""
from __future__ import annotations

import contextlib
import warnings

from ...errors import ConfigError
from . import registry, targeting
from .base import BASE_ROWS, AdapterLayer, ModulesToSaveWrapper, refuse_tied, tied_uses
from .config import PeftConfig


def check_adapter_name(peft_model, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_ROWS:
        raise ValueError(f"adapter name {name!r} must be a non-empty string without '.', not {BASE_ROWS!r}")
    if name in peft_model.peft_config:
        raise ValueError(f"an adapter named {name!r} already exists")


def inject(peft_model, name: str, config, for_loading: bool = False) -> None:
    """Adapt the model with ``config`` under ``name``: the method's layers, then modules_to_save.

    ``target_modules`` is made explicit first, as PEFT stores it (the method's LLaMA
    default for None, full names for "all-linear"). ``for_loading`` skips inits that
    rewrite base weights (PiSSA): a loaded adapter brings its own weights.
    """
    check_adapter_name(peft_model, name)
    method = registry.method_for(config)
    kinds = {c.peft_type for c in peft_model.peft_config.values()}
    if kinds and kinds != {config.peft_type}:
        raise ConfigError(f"cannot add a {config.peft_type} adapter next to {sorted(kinds)} adapters (as in PEFT)")
    model = peft_model.base_model.model
    if isinstance(config, PeftConfig):  # a method that adapts named modules
        config = targeting.resolve_target_modules(model, config, method.default_target_modules)
    config = config.for_model(model)  # sizes PEFT fills in from the model (prompt learning: num_layers ...)
    method.apply(model, config.for_loading() if for_loading else config, peft_model.rng, adapter_name=name)
    add_modules_to_save(model, getattr(config, "modules_to_save", None), name)
    peft_model.peft_config[name] = config
    if config.inference_mode:
        peft_model.state.freeze(name)
    warn_tied_targets(peft_model, name)


def add_modules_to_save(model, modules_to_save, name: str) -> None:
    """Wrap every module PEFT's suffix rule selects in a ModulesToSaveWrapper with a copy for ``name``."""
    if not modules_to_save:
        return
    chosen = []
    for path, module in targeting.candidate_modules(model):
        if targeting.wraps_as_saved(modules_to_save, path) and not any(path.startswith(c + ".") for c in chosen):
            if isinstance(module, AdapterLayer):
                raise ConfigError(f"modules_to_save entry matches {path!r}, which an adapter already adapts")
            chosen.append(path)
    if not chosen:
        warnings.warn(f"modules_to_save {list(modules_to_save)} matched no module of the model", stacklevel=3)
    for path in chosen:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            model.set_submodule(path, module)
        module.add(name)


def warn_tied_targets(peft_model, name: str) -> None:
    for path, module in peft_model.adapter_layers(name, AdapterLayer):
        if len(tied := tied_uses(peft_model.base_model.model, path)) > 1:
            warnings.warn(f"{path} is adapted but its weight is tied to {tied}: the adapter changes only "
                          f"{path}, and merging it is refused (it would change every tied use)", stacklevel=4)


def add_adapter(peft_model, name: str, config, for_loading: bool = False) -> None:
    """A new adapter, not active (hence frozen) until set_adapter, as PEFT's add_adapter."""
    inject(peft_model, name, config, for_loading=for_loading)
    peft_model.sync()


def set_adapter(peft_model, names, inference_mode: bool = False) -> None:
    """Activate ``names`` (one name, or a list: PEFT's ``base_model.set_adapter``); they train
    unless ``inference_mode``. A module can run only one modules_to_save copy at a time."""
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in peft_model.peft_config]
    if missing or not names:
        raise ValueError(f"adapter(s) {missing or names} not found; adapters: {sorted(peft_model.peft_config)}")
    for module in peft_model.adapter_modules():
        if isinstance(module, ModulesToSaveWrapper) and sum(n in module.modules_to_save for n in names) > 1:
            raise ValueError(f"adapters {names} each have a modules_to_save copy of the same module; "
                             "only one of them can be active")
    peft_model.state.activate(names, inference_mode)
    peft_model.sync()


def delete_adapter(peft_model, name: str) -> None:
    """Remove adapter ``name`` everywhere (it must not be merged); if it was active, the
    first remaining adapter becomes active."""
    if name not in peft_model.peft_config:
        raise ValueError(f"adapter {name!r} does not exist; adapters: {sorted(peft_model.peft_config)}")
    for path, module in peft_model.named_adapter_modules():
        if isinstance(module, AdapterLayer) and name in module.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into {path}; call unmerge_adapter() first")
    for module in peft_model.adapter_modules():
        if name in module.adapter_names():
            module.delete_adapter(name)
    del peft_model.peft_config[name]
    peft_model.state.forget(name, list(peft_model.peft_config))
    peft_model.sync()


@contextlib.contextmanager
def disable_adapter(peft_model):
    """Run the base model's function inside the block: adapters are off (and frozen).

    Merged adapters are unmerged on entry and merged again on exit (PEFT unmerges and
    leaves them unmerged). As PEFT warns, trained biases (bias != "none") stay in effect.
    """
    if any(getattr(c, "bias", "none") != "none" for n, c in peft_model.peft_config.items()
           if n in peft_model.state.active):
        warnings.warn("adapters with bias='all' or 'lora_only' trained biases of the base model: "
                      "with the adapters disabled the output still differs from the base model", stacklevel=3)
    merged = {id(m): list(m.merged_adapters) for m in peft_model.adapter_modules() if isinstance(m, AdapterLayer)}
    unmerge_adapter(peft_model)
    peft_model.state.disabled = True
    peft_model.sync()
    try:
        yield peft_model
    finally:
        peft_model.state.disabled = False
        peft_model.sync()
        for module in peft_model.adapter_modules():
            if merged.get(id(module)):
                module.merge(merged[id(module)])


def merge_adapter(peft_model, adapter_names=None, safe_merge: bool = False) -> None:
    """Merge ``adapter_names`` (default: the active adapters), in order, into the base weights.

    Merging twice is a no-op. A weight tied to another module (an input embedding tied
    to the output head) is refused: merging would change both uses.
    """
    names = list(peft_model.state.active if adapter_names is None else adapter_names)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"cannot merge unknown adapter(s) {unknown}")
    refuse_unmergeable(peft_model, names)
    layers = [(p, m) for p, m in peft_model.named_adapter_modules()
              if isinstance(m, AdapterLayer) and any(n in m.adapter_names() for n in names)]
    refuse_tied(peft_model.base_model.model,
                [path for path, layer in layers
                 if any(n not in layer.merged_adapters for n in names if n in layer.adapter_names())],
                "cannot merge into")
    for _, layer in layers:
        layer.merge(names, safe=safe_merge)


def refuse_unmergeable(peft_model, names) -> None:
    """ConfigError, before anything changes, for an adapter whose method has no merge."""
    for name in names:
        peft_type = peft_model.peft_config[name].peft_type
        if not registry.get_method(peft_type).mergeable:
            raise ConfigError(f"adapter {name!r} is a {peft_type} adapter, which cannot be merged into the base "
                              "weights (it is not a weight update); use it unmerged, e.g. generate --adapter")


def unmerge_adapter(peft_model) -> None:
    """Take every merged adapter out of the base weights again."""
    for module in peft_model.adapter_modules():
        if isinstance(module, AdapterLayer):
            module.unmerge()


def unload(peft_model, merge: bool, safe_merge: bool = False, adapter_names=None):
    """Replace every adapter layer by its base layer and return the plain model.

    ``merge=True`` (merge_and_unload): adapters merged first; a modules_to_save wrapper
    becomes the active adapter's copy. ``merge=False`` (unload): merged adapters are
    unmerged first and wrappers become their originals, giving the original base model
    back. Either way the PeftModel is left without adapters, and the returned model's
    parameters all require grad again, as a freshly loaded model's do.
    """
    if merge:
        refuse_unmergeable(peft_model, list(peft_model.peft_config))
        merge_adapter(peft_model, adapter_names, safe_merge)
    else:
        unmerge_adapter(peft_model)
    model = peft_model.base_model.model
    for path, module in peft_model.named_adapter_modules():
        if isinstance(module, AdapterLayer):
            model.set_submodule(path, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            active = next((n for n in peft_model.state.active if n in module.modules_to_save), None)
            model.set_submodule(path, module.module_for(active if merge else None))
        else:  # a holder the method added beside the model's own modules (a prompt encoder, adapters)
            parent, _, attr = path.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, attr)
    for peft_type in dict.fromkeys(c.peft_type for c in peft_model.peft_config.values()) if merge else ():
        if (after := registry.get_method(peft_type).after_unload) is not None:
            after(model)  # what merging added becomes part of the model (BitFit: created biases, in its config)
    peft_model.peft_config.clear()
    peft_model.state.clear()
    for p in model.parameters():
        p.requires_grad = True
    return model
