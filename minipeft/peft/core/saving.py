"""Adapters on disk in Hugging Face PEFT's layout (REFERENCE 1.3), both directions.

A folder holds ``adapter_config.json`` (``json.dumps(config.to_dict(), indent=2,
sort_keys=True)``, ``inference_mode`` true) and ``adapter_model.safetensors``
(metadata ``{"format": "pt"}``). Tensor keys are the in-memory names with the
adapter name removed, which each adapter layer spells out in ``adapter_state``:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight        (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight        (out, r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector (out,)  DoRA
    base_model.model.model.embed_tokens.lora_embedding_A                   (r, num)
    base_model.model.lm_head.weight                       a modules_to_save copy
    base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias       bias="lora_only"
                                                          (bias="all": every bias of the model)

A method may keep files beside these two (its row's ``save_extra`` / ``load_extra``:
ReLoRA's ``relora_merged.safetensors``, DyLoRA's ``dylora_state.json``), or write another
library's layout instead (``write_folder`` / ``read_folder_config`` / ``read_folder_weights``:
bottleneck adapters in the ``adapters`` library's files). Safetensors only: a pickle file
(``adapter_model.bin``) is refused with a message saying how to re-save it, never unpickled.

As PEFT, an adapter on ``embed_tokens`` / ``lm_head`` also saves that layer's base
weight (``save_embedding_layers="auto"``, with PEFT's warning); PEFT's further
"auto" check for a resized vocabulary (which reads the base model's config from
the Hub) is not done. Loading is strict: every adapter tensor must be in the file,
nothing else may be (except base weights of the model, such as those embeddings),
and a wrong shape names the key and both shapes; nothing changes unless every
check passes.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np

from ...backend import to_device
from ...errors import CheckpointError, ConfigError
from ...io import read_json, read_safetensors, read_safetensors_header, write_json, write_safetensors
from ...io.safetensors import check_finite_floats
from . import registry
from .base import AdapterLayer, ModulesToSaveWrapper
from .names import CONFIG_NAME, EMBEDDING_LAYER_NAMES, PICKLE_NAMES, PREFIX, WEIGHTS_NAME, adapter_folder



def adapter_parameters(peft_model, name: str) -> dict:
    """File key -> Parameter for everything adapter ``name`` saves, except embedding layers."""
    out = {}
    for path, module in peft_model.named_adapter_modules():
        if name in module.adapter_names():
            for key, p in module.adapter_state(name).items():
                out[module.file_key(path, key)] = p
    by_id = {id(p): n for n, p in peft_model.base_model.model.named_parameters()}
    for p in peft_model.bias_parameters(name):
        out[PREFIX + by_id[id(p)]] = p
    return out


def embedding_parameters(peft_model, name: str, save_embedding_layers) -> dict:
    """PEFT's ``save_embedding_layers``: the base weights of the input / output embeddings."""
    config, model = peft_model.peft_config[name], peft_model.base_model.model
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        targeted = any(re.fullmatch(targets, path) for path, _ in model.named_modules()
                       if re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", path))
    else:
        targeted = any(e in (targets or ()) for e in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        if targeted:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in "
                          "`target_modules`.", stacklevel=3)
        save_embedding_layers = targeted
    out = {}
    if save_embedding_layers:
        for path in ("model.embed_tokens", "lm_head"):
            module = model.get_submodule(path)
            if isinstance(module, AdapterLayer):
                out[f"{PREFIX}{path}.base_layer.weight"] = module.base_layer.weight
            elif not targeted and not isinstance(module, ModulesToSaveWrapper):
                out[f"{PREFIX}{path}.weight"] = module.weight
    return out


def save_pretrained(peft_model, folder, selected_adapters=None, save_embedding_layers="auto") -> None:
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(f"cannot save adapters to '{folder}': it is a file, expected a folder")
    names = list(peft_model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"cannot save unknown adapter(s) {unknown}")
    base_name = getattr(peft_model.base_model.model, "name_or_path", None)
    for name in names:
        out = adapter_folder(folder, name)
        out.mkdir(parents=True, exist_ok=True)
        write_folder = registry.get_method(peft_model.peft_config[name].peft_type).write_folder
        if write_folder is not None:  # another library's layout (bottleneck adapters)
            write_folder(peft_model, name, out)
            continue
        params = {**adapter_parameters(peft_model, name),
                  **embedding_parameters(peft_model, name, save_embedding_layers)}
        tensors = {k: p.data for k, p in params.items()}
        crop = registry.get_method(peft_model.peft_config[name].peft_type).saved_tensors
        if crop is not None:  # AdaLoRA writes A, E, B cropped to the ranks its rank_pattern keeps
            tensors = crop(peft_model, name, tensors)
        write_safetensors(out / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        config = peft_model.peft_config[name]
        config = config.replace(inference_mode=True,
                                base_model_name_or_path=config.base_model_name_or_path or base_name)
        write_json(out / CONFIG_NAME, config.to_dict(), sort_keys=True, end="")  # as PEFT writes it
        save_extra = registry.get_method(config.peft_type).save_extra
        if save_extra is not None:  # e.g. ReLoRA's relora_merged.safetensors
            save_extra(peft_model, name, out)


def read_config(folder):
    """The config of the adapter in ``folder``: PEFT's ``adapter_config.json`` as the class its
    ``peft_type`` names, or another layout a method recognises (``read_folder_config``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder '{folder}' does not exist or is not a folder")
    refuse_pickles(folder)
    for method in registry.METHODS:
        if method.read_folder_config is not None and (config := method.read_folder_config(folder)) is not None:
            return config
    path = folder / CONFIG_NAME
    try:
        config = registry.config_from_dict(read_json(path, "adapter config", ConfigError), source=str(path))
    except ConfigError as exc:  # e.g. an unknown peft_type: say which file it came from
        if str(path) in str(exc):
            raise
        raise ConfigError(f"adapter config '{path}': {exc}") from None
    check_sizes_fit(config, path, folder / WEIGHTS_NAME)
    return config


# Size fields whose value the layers allocate, at least once per adapted module, in values:
# r·(in + out) ≥ r for the LoRA family, num_virtual_tokens·dim for prompt learning.
# Left out: AdaLoRA saves factors cropped to the ranks it kept, and LoKr stores a full factor
# (no r at all) once r reaches the factor's size, so r does not bound their files from below.
_SIZE_FIELDS = ("r", "num_virtual_tokens")
_SIZES_UNBOUNDED = ("ADALORA", "LOKR")


def check_sizes_fit(config, config_path, weights_path) -> None:
    """Refuse sizes in the config that the weights file cannot hold, before any layer is
    built: ``r: 1000000`` in a small adapter would allocate until the machine runs out of
    memory. Reads only the file's header. (Missing files are reported by the loaders.)"""
    if config.peft_type in _SIZES_UNBOUNDED or not Path(weights_path).is_file():
        return
    infos, _ = read_safetensors_header(weights_path)
    stored = sum(math.prod(info.shape) for info in infos.values())
    sizes = {name: getattr(config, name) for name in _SIZE_FIELDS if hasattr(config, name)}
    pattern = getattr(config, "rank_pattern", None) or {}
    sizes.update((f"rank_pattern[{key!r}]", value) for key, value in pattern.items())
    for name, size in sizes.items():
        if isinstance(size, int) and size > stored:
            raise CheckpointError(
                f"adapter config '{config_path}': {name} = {size:,} needs at least {size:,} values per "
                f"adapted module, but '{weights_path}' holds {stored:,} values in all; "
                "the config does not fit the weights")


def refuse_pickles(folder: Path) -> None:
    """A folder holding only pickle weights (``adapter_model.bin`` ...) is refused: never unpickled."""
    if any(folder.glob("*.safetensors")):
        return
    for name in PICKLE_NAMES:
        if (folder / name).exists():
            raise CheckpointError(
                f"'{folder / name}' is a pickle file, which minipeft never loads (unpickling runs arbitrary code); "
                "re-save the adapter as safetensors: in PEFT, model.save_pretrained(dir) (safe_serialization=True "
                "is the default), in the adapters library, model.save_adapter(dir, name, use_safetensors=True)")


def load_weights(peft_model, folder, name: str) -> None:
    """Copy the adapter's tensors in ``folder`` into adapter ``name``, checking everything first."""
    read_weights = registry.get_method(peft_model.peft_config[name].peft_type).read_folder_weights
    if read_weights is not None:  # another library's layout
        read_weights(peft_model, name, Path(folder))
        return
    path = Path(folder) / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"adapter file '{path}' does not exist")
    tensors = read_safetensors(path)
    expected = adapter_parameters(peft_model, name)
    base = {PREFIX + n: p for n, p in peft_model.base_model.model.named_parameters()}
    for key, p in {**expected, **base}.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(p.shape):
            raise CheckpointError(
                f"adapter file '{path}' does not fit the model: tensor {key!r} has shape "
                f"{tuple(tensors[key].shape)}, the model expects {tuple(p.shape)} "
                "(was the adapter saved for another base model?)")
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected and k not in base]
    if missing or unexpected:
        parts = ([f"missing keys: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []) + \
                ([f"unexpected keys: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"]
                 if unexpected else [])
        raise CheckpointError(f"adapter file '{path}' does not fit the model: " + " | ".join(parts))
    check_finite_floats(path, tensors)  # every key is a parameter's now: floats, finite
    load_extra = registry.get_method(peft_model.peft_config[name].peft_type).load_extra
    if load_extra is not None:  # checks its own files before it changes anything (ReLoRA replays merges)
        load_extra(peft_model, name, Path(folder))
    for key, array in tensors.items():
        p = expected.get(key, base.get(key))
        p.data = to_device(np.asarray(array, dtype=p.dtype), p.device)
