"""Which modules a config adapts: Hugging Face PEFT's matching rules (REFERENCE 1.4).

Each rule is a small pure function of a module name, so it can be read and
tested on its own; :func:`find_targets` applies them to a model.

* ``target_modules`` as a list: a name matches when it equals an entry or ends
  with ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).
  ``layers_to_transform`` (with ``layers_pattern``) then keeps only the listed
  layer indices; a name equal to an entry skips that filter, as in PEFT.
* ``target_modules`` as a string: a regex that must match the whole name
  (``re.fullmatch``). ``"all-linear"`` means every Linear except the output head.
* ``exclude_modules``: the same two rules; an excluded module is never adapted.
* ``modules_to_save`` entries are never adapted (they become trainable copies).
* ``rank_pattern`` / ``alpha_pattern``: the first key, in dict order, whose regex
  matches the end of the name at a dot boundary gives the value.
"""
from __future__ import annotations

import re

from ...errors import ConfigError
from ...nn import Linear, Module
from .base import AdapterHolder, AdapterLayer

ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"  # LlamaForCausalLM's output embedding, never part of "all-linear"


def matches(targets, name: str) -> bool:
    """PEFT's rule for ``target_modules`` / ``exclude_modules`` (without the layer filter)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The index after the first numbered segment (``model.layers.3.mlp`` → 3), or after
    one of ``layers_pattern``'s names; None when the name has none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = (layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def in_layers(name: str, layers_to_transform, layers_pattern=None) -> bool:
    """True when ``layers_to_transform`` is unset or lists the name's layer index."""
    if layers_to_transform is None or layers_to_transform == ():
        return True
    index = layer_index(name, layers_pattern)
    if index is None:
        return False
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def is_saved_module(modules_to_save, name: str) -> bool:
    """Does ``name`` lie at or under an entry of ``modules_to_save`` (at dot boundaries)?"""
    return bool(modules_to_save) and any(
        re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def wraps_as_saved(modules_to_save, name: str) -> bool:
    """PEFT's rule for which modules become ``modules_to_save`` copies: a plain suffix match."""
    return bool(modules_to_save) and any(name.endswith(m) for m in modules_to_save)


def is_target(config, name: str) -> bool | None:
    """True: adapt ``name``; False: not a target; None: matched but excluded."""
    if matches(config.exclude_modules, name) or is_saved_module(config.modules_to_save, name):
        return None
    targets = config.target_modules
    if isinstance(targets, str) or name in targets:
        return matches(targets, name)
    if not matches(targets, name):
        return False
    return in_layers(name, config.layers_to_transform, config.layers_pattern)


def pattern_value(patterns: dict, name: str, default):
    """``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching ``(.*\\.)?(key)$``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ----- walking a model ------------------------------------------------------------------
def candidate_modules(model: Module) -> list[tuple[str, Module]]:
    """Named modules of ``model`` that a config may target: everything except the root
    and the insides of adapter layers and modules_to_save copies."""
    inside = set()
    out = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        out.append((name, module))
        if isinstance(module, AdapterHolder):
            inside.add(name + ".")
    return out


def all_linear_names(model: Module) -> tuple[str, ...]:
    """Full names of every Linear (or adapted Linear) except the output head."""
    names = []
    for name, module in candidate_modules(model):
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        if isinstance(base, Linear) and name != OUTPUT_HEAD:
            names.append(name)
    return tuple(names)


def resolve_target_modules(model: Module, config, default: tuple[str, ...]):
    """The config with ``target_modules`` made explicit, as PEFT stores it: the method's
    default for LLaMA when None, the list of full names for ``"all-linear"``."""
    targets = config.target_modules
    if targets is None:
        return config.replace(target_modules=default)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return config.replace(target_modules=all_linear_names(model))
    return config


def find_targets(model: Module, config, supported: tuple[type, ...], method: str) -> list[str]:
    """Names of the modules ``config`` adapts, in model order; checked before anything changes.

    Raises ``ConfigError`` when nothing matches (listing names the model has) or when
    a matched module is of a kind the method cannot adapt.
    """
    found, excluded = [], []
    for name, module in candidate_modules(model):
        verdict = is_target(config, name)
        if verdict is None:
            excluded.append(name)
        elif verdict:
            if not isinstance(module, supported):
                kinds = ", ".join(t.__name__ for t in supported)
                raise ConfigError(f"target module {name!r} is a {type(module).__name__}; "
                                  f"{method} adapts only {kinds} layers")
            found.append(name)
    if not found:
        detail = f"target_modules {_show(config.target_modules)} matched no module of the model"
        if excluded:
            detail += f" that is not excluded (exclude_modules / modules_to_save removed {len(excluded)})"
        if config.layers_to_transform is not None:
            layers = config.layers_to_transform
            detail += f" in layers_to_transform={list(layers) if isinstance(layers, tuple) else layers!r}"
        raise ConfigError(f"{detail}; module names end in: {available_names(model)}")
    return found


def available_names(model: Module, limit: int = 12) -> str:
    """A few distinct last components of layer names, for error messages."""
    seen = []
    for name, module in candidate_modules(model):
        last = name.rsplit(".", 1)[-1]
        leaf = isinstance(module, AdapterHolder) or not list(module.named_children())
        if leaf and not last.isdigit() and last not in seen:
            seen.append(last)
    return ", ".join(seen[:limit]) + (", ..." if len(seen) > limit else "")


def _show(targets) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets or ()))


def parse_targets(text: str | None):
    """A command-line ``--target``: 'q_proj,v_proj' -> a list; 'all-linear' stays a string, as PEFT
    expects; None (not given) -> None, the method's default."""
    if text is None:
        return None
    return text if text == ALL_LINEAR else [t.strip() for t in text.split(",") if t.strip()]
