"""`PeftConfig`: the fields every PEFT method shares, and PEFT's ``adapter_config.json``.

A config is a frozen dataclass, validated when built (a ``ConfigError``, which is
a ``ValueError``, names the field). Method configs (``LoraConfig`` ...) subclass
it and add their own fields, PEFT's names and defaults throughout.

On disk (Hugging Face PEFT's layout, REFERENCE 1.3) the config is
``json.dumps(to_dict(), indent=2, sort_keys=True)`` with sets and tuples as lists.
``to_dict`` writes every key PEFT 0.21's config class writes, so PEFT loads the
file without warnings: the keys of PEFT features minipeft lacks are written with
PEFT's defaults (``PEFT_FIXED``), and ``from_dict`` refuses a file that sets one
of them to anything else, naming the key. Keys neither side knows are dropped
with a warning, as PEFT does, so files from newer versions still load.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

from ...errors import ConfigError

# The PEFT release whose file format minipeft writes (the ``peft_version`` key).
PEFT_FORMAT_VERSION = "0.21.2"
TASK_TYPES = (None, "CAUSAL_LM")
# transformers' class of the model, written as ``auto_mapping`` when task_type is None (as PEFT does).
AUTO_MAPPING = {"base_model_class": "LlamaForCausalLM",
                "parent_library": "transformers.models.llama.modeling_llama"}


@dataclass(frozen=True)
class BaseConfig:
    """Fields every method's config has (PEFT's ``PeftConfigMixin``): the task, the base model,
    inference mode. Methods that do not adapt named modules (prompt / prefix tuning) build
    on this; those that do, on :class:`PeftConfig`."""

    peft_type: ClassVar[str] = ""  # "LORA", ... (set by each method's config class)
    PEFT_FIXED: ClassVar[dict] = {}  # PEFT keys minipeft writes with PEFT's defaults only
    PEFT_INERT: ClassVar[frozenset] = frozenset()  # of those, keys whose value is ignored on reading

    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a NaN lora_alpha gave NaN logits and a NaN merge
            if (where := _non_finite(getattr(self, f.name))) is not None:
                self._fail(f.name, f"must hold finite numbers, got {where}")
        if self.task_type not in TASK_TYPES:
            self._fail("task_type", f"must be one of {TASK_TYPES}, got {self.task_type!r}")
        if not isinstance(self.inference_mode, bool):
            self._fail("inference_mode", f"must be true or false, got {self.inference_mode!r}")

    # ----- helpers for subclasses ---------------------------------------------------
    def _set(self, name, value):
        object.__setattr__(self, name, value)

    def _fail(self, name, message):
        raise ConfigError(f"{type(self).__name__} field {name!r} {message}")

    def _require(self, name, ok: bool, message: str) -> None:
        if not ok:
            self._fail(name, f"{message}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "BaseConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def for_loading(self) -> "BaseConfig":
        """The config to build layers with before loading saved weights into them: methods
        whose init rewrites base weights (LoRA's PiSSA) switch that init off."""
        return self

    def for_model(self, model) -> "BaseConfig":
        """The config with the sizes PEFT fills in from the model made explicit (prompt learning's
        ``num_layers``, ``token_dim`` ...), as PEFT stores them; checked against the model."""
        return self

    # ----- adapter_config.json ------------------------------------------------------
    def to_dict(self) -> dict:
        """PEFT's ``adapter_config.json`` object: every key PEFT writes, sets/tuples as lists."""
        out = {key: _jsonable(value) for key, value in self.PEFT_FIXED.items()}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        if out["task_type"] is None and out["auto_mapping"] is None:
            out["auto_mapping"] = dict(AUTO_MAPPING)
        out["peft_type"] = self.peft_type
        out["peft_version"] = PEFT_FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, raw: dict, source: str = "adapter config") -> "BaseConfig":
        """Build from an ``adapter_config.json`` object (PEFT's or ours).

        Unknown keys are dropped with a warning naming them; a PEFT feature minipeft
        lacks, switched on, raises ``ConfigError`` naming the key.
        """
        raw = dict(raw)
        peft_type = raw.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ConfigError(f"{source}: peft_type is {peft_type!r}, expected {cls.peft_type!r}")
        raw.pop("peft_version", None)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in [k for k in raw if k in cls.PEFT_FIXED]:
            value, default = raw.pop(key), cls.PEFT_FIXED[key]
            # None, {}, false and [] all mean "off"
            if key not in cls.PEFT_INERT and value != default and (value or default):
                raise ConfigError(
                    f"{source}: {key!r} = {value!r} is a PEFT feature minipeft does not implement "
                    f"(only {default!r} is supported)"
                )
        unknown = sorted(k for k in raw if k not in names)
        if unknown:
            warnings.warn(f"{source}: ignoring keys {cls.__name__} does not know: {unknown} "
                          "(written by a newer version?)", stacklevel=2)
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except ConfigError as exc:  # a field's error, told with the file it came from
            raise ConfigError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class PeftConfig(BaseConfig):
    """Fields shared by the methods that adapt named modules of a model (PEFT's names).

    ``target_modules``: a list (a module matches when its name equals an entry or ends
    with ``"." + entry``), a regex string matched against the whole name, or
    ``"all-linear"``; ``None`` takes the method's default for LLaMA. See targeting.py.
    """

    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            self._set(name, _names(self, name, getattr(self, name), sort=True))
        self._set("layers_pattern", _names(self, "layers_pattern", self.layers_pattern, sort=False))
        modules = _names(self, "modules_to_save", self.modules_to_save, sort=False)
        if isinstance(modules, str):
            modules = (modules,)
        self._set("modules_to_save", modules)
        layers = self.layers_to_transform
        if isinstance(layers, (list, tuple)):
            layers = tuple(layers)
        if layers is not None and not all(_is_int(i) and i >= 0 for i in _as_tuple(layers)):
            self._fail("layers_to_transform", f"must be a layer index or a list of them, got {layers!r}")
        self._set("layers_to_transform", layers)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            self._fail("layers_pattern", "needs layers_to_transform as well (as in PEFT)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            self._fail("layers_to_transform", "cannot be used when target_modules is a regex string (as in PEFT)")
        self._check_regexes()

    def _check_regexes(self) -> None:
        """Every string that targeting.py uses as a regex compiles, in the form it is used
        there (an invalid one used to surface as a re.error traceback at model-wrapping time)."""
        patterns = [("target_modules", self.target_modules if isinstance(self.target_modules, str) else None),
                    ("exclude_modules", self.exclude_modules if isinstance(self.exclude_modules, str) else None)]
        patterns += [("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
                     for p in _as_tuple(self.layers_pattern or ())]
        for name in ("rank_pattern", "alpha_pattern"):  # LoRA family: regex keys -> values
            if isinstance(table := getattr(self, name, None), dict):
                patterns += [(name, rf"(.*\.)?({key})$") for key in table]
        for name, pattern in patterns:
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except (re.error, TypeError, RecursionError, OverflowError) as exc:
                self._fail(name, f"holds an invalid regular expression ({exc})")


# ----- small validators -----------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _names(config, field_name, value, sort: bool):
    """None, one string, or a (sorted, de-duplicated when ``sort``) tuple of strings."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return tuple(sorted(set(value))) if sort else tuple(value)
    config._fail(field_name, f"must be a string or a list of strings, got {value!r}")


def _non_finite(value, depth: int = 0):
    """The first NaN / Infinity in a field's value (looking into lists and dicts), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if depth < 8 and isinstance(value, (list, tuple, set, frozenset, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            if (found := _non_finite(item, depth + 1)) is not None:
                return found
    return None


def _jsonable(value):
    if isinstance(value, (tuple, list, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
