"""Loading and saving Hugging Face model folders.

A folder holds ``config.json``, the weights (``model.safetensors`` or shards
listed in ``model.safetensors.index.json``) and optionally
``generation_config.json``. Since module paths equal checkpoint keys, loading
is: read config, build the model, check every key and shape against it, set.
Weights stored as F16 or BF16 are converted to float32 (the compute dtype), once;
float32 weights are not copied at all: the parameters are views of the copy-on-write
memory map :func:`~minipeft.io.safetensors.read_safetensors` makes, so pages are read
from the file when first used and copied only when a parameter is written.
A ``.gguf`` file (llama.cpp's format) loads too: config and weights come from
:mod:`minipeft.io.gguf`, dequantized to float32, then go through the same checks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import load_model_tensors, read_json, save_model_tensors, write_json
from ..io.safetensors import check_finite_floats
from .config import LlamaConfig

# Keys some checkpoints carry that are not weights: recomputed buffers.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def weights_file_name(folder: Path) -> Path:
    """The file that names the weights (single file, or the shard index) — for messages."""
    single = folder / "model.safetensors"
    return single if single.exists() else folder / "model.safetensors.index.json"


def is_gguf(path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix) rather than a model folder."""
    return Path(path).suffix.lower() == ".gguf" and not Path(path).is_dir()


def load_gguf(cls, path: Path, device: str, dtype):
    from ..io.gguf import read_gguf  # gguf is imported only when a GGUF file is loaded

    raw, tensors = read_gguf(path)
    try:
        config = LlamaConfig.from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    check_finite_floats(path, tensors)  # dequantized float32: a NaN / Inf block is named by its HF key
    config.check_fits(sum(int(t.size) for t in tensors.values()), path, path)  # before cls()
    model = cls(config)
    # asarray: no copy when the dtype already matches (float32 dequantized weights)
    model.load_state_dict({k: np.asarray(v, dtype=dtype) for k, v in tensors.items()}, source=str(path))
    return model.to(device=device, dtype=dtype)


def load_pretrained(cls, folder, device: str = "cpu", dtype=np.float32):
    folder = Path(folder)
    if is_gguf(folder):
        return load_gguf(cls, folder, device, dtype)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    config = LlamaConfig.from_json(folder / "config.json")
    tensors = load_model_tensors(folder)
    source = weights_file_name(folder)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        # transformers ties the head to the embedding and ignores a stored copy.
        tensors.pop("lm_head.weight", None)
    config.check_fits(sum(int(t.size) for t in tensors.values()), folder / "config.json", source)  # before cls()
    model = cls(config)
    model.load_state_dict({k: np.asarray(v, dtype=dtype) for k, v in tensors.items()},
                          source=f"{source} (with {folder / 'config.json'})")
    generation = folder / "generation_config.json"
    if generation.exists():
        model.generation_config = read_json(generation, "generation config")
    return model.to(device=device, dtype=dtype)


def save_pretrained(model, folder, dtype=None, max_shard_bytes: int | None = None) -> None:
    """Write a folder transformers' ``from_pretrained`` loads (tied head not stored, as HF does)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = model.state_dict()
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    config = model.config.to_dict()
    # transformers >= 4.56 reads "dtype" (older ones "torch_dtype"); write both, so a stale
    # "dtype" kept from the loaded config.json cannot contradict the weights written here.
    name = np.dtype(dtype or np.float32).name  # float32, float16 or bfloat16
    config["dtype"] = config["torch_dtype"] = name
    write_json(folder / "config.json", config, sort_keys=True)
    if model.generation_config:
        write_json(folder / "generation_config.json", model.generation_config, sort_keys=True)
    save_model_tensors(folder, tensors, max_shard_bytes=max_shard_bytes)

