"""Hugging Face model folders: the weights of ``save_pretrained`` / ``from_pretrained``.

A folder holds either one ``model.safetensors`` or, for large models, shards
``model-00001-of-00003.safetensors`` ... plus ``model.safetensors.index.json``::

    {"metadata": {"total_size": <bytes>}, "weight_map": {key: shard_filename}}

Loading checks the index against the shards in both directions (every listed
key is in its shard, no shard holds a key the index does not list), because a
mismatch there means a mixed-up or half-copied folder. Saving writes one file
unless ``max_shard_bytes`` asks for shards, each file atomically, with the
``{"format": "pt"}`` metadata that transformers requires to load it.
PyTorch pickles (``pytorch_model.bin``) are not read: unpickling runs code.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..errors import CheckpointError, ConfigError, MiniPeftError
from .safetensors import atomic_write, check_finite_floats, read_safetensors, write_safetensors

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-(\d{5})\.safetensors")


def write_json(path, data, *, indent: int = 2, sort_keys: bool = False, default=None, end: str = "\n") -> None:
    """Write ``data`` as UTF-8 JSON atomically: the one JSON writer (``end=""`` for PEFT's
    exact bytes, which have no final newline)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=default) + end
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path, what: str, error: type[MiniPeftError] = CheckpointError) -> dict:
    """Load a JSON file that must hold an object, e.g. ``read_json(p, "model config")``.

    ``what`` describes the file in the message. A missing file, bad UTF-8,
    invalid JSON (with line and column) or a top-level value that is not an
    object raises ``error`` (:class:`CheckpointError` by default, pass
    :class:`ConfigError` for config files) naming the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} '{path}' is a folder, expected a JSON file") from None
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:  # no permission, an I/O error ...
        raise error(f"{what} '{path}' cannot be read: {exc.strerror or exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{what} '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except RecursionError:  # Python's parser recurses once per level of [ or {
        raise error(f"{what} '{path}' is JSON nested too deeply to be a {what}") from None
    if not isinstance(value, dict):
        raise error(f"{what} '{path}' must hold a JSON object, got {type(value).__name__}")
    return value


def _weight_map(index_path: Path) -> dict[str, str]:
    """Read and type-check the index's weight_map (key -> shard file name)."""
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"safetensors index '{index_path}' has no 'weight_map' object")
    for key, shard in weight_map.items():
        # a bare file name: the index must not point outside its folder
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CheckpointError(
                f"safetensors index '{index_path}': key {key!r} maps to {shard!r}, "
                "expected a shard file name in the same folder"
            )
    return weight_map


def _load_sharded(folder: Path, index_path: Path) -> dict[str, np.ndarray]:
    weight_map = _weight_map(index_path)
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    # A sibling of a listed series (model-00002-of-00003 when 00001 is listed) that the
    # index never names would have its tensors silently dropped.
    for total in {m.group(1) for s in by_shard if (m := _SHARD_RE.fullmatch(s))}:
        for i in range(1, int(total) + 1):
            sibling = f"model-{i:05d}-of-{total}.safetensors"
            if sibling not in by_shard and (folder / sibling).is_file():
                raise CheckpointError(f"shard '{folder / sibling}' exists but the safetensors "
                                      f"index '{index_path}' maps no key to it")
    tensors: dict[str, np.ndarray] = {}
    for shard, keys in by_shard.items():
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(
                f"safetensors index '{index_path}' lists shard '{shard}' (for key {keys[0]!r}) "
                "but that file does not exist"
            )
        loaded = read_weights(shard_path)
        for key in keys:
            if key not in loaded:
                raise CheckpointError(
                    f"safetensors index '{index_path}' maps key {key!r} to shard '{shard}', "
                    "but that shard has no such tensor"
                )
        for key in loaded:
            if weight_map.get(key) != shard:
                raise CheckpointError(
                    f"shard '{shard_path}' holds tensor {key!r} that the safetensors index "
                    f"'{index_path}' does not map to it"
                )
        tensors.update(loaded)
    return tensors


def read_weights(path) -> dict[str, np.ndarray]:
    """A model's weights file: every tensor a finite float (see check_finite_floats)."""
    tensors = read_safetensors(path)
    check_finite_floats(path, tensors)
    return tensors


def check_output_folder(out, flag: str, inputs: dict[str, str] | None = None) -> Path:
    """Refuse an output folder that would overwrite an input or cannot be written, before
    anything is written (a command that fails after writing half a folder loses data).

    ``flag`` names the option in messages (``"--out"``), ``inputs`` maps the other options
    to their folders (``{"--model": ...}``); ``out`` may not be any of them, by any spelling
    (``X/.``, a symbolic link). ``out`` must be a folder or not exist yet, and the nearest
    existing folder on its way must be writable.
    """
    out = Path(out)
    for other, folder in (inputs or {}).items():
        if folder is not None and os.path.realpath(out) == os.path.realpath(folder):
            raise CheckpointError(f"{flag} '{out}' is the {other} folder '{folder}'; writing there would "
                                  f"overwrite what it reads: give {flag} another folder")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{flag} '{out}' is a file, expected a folder (or a path that does not exist yet)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointError(f"{flag} '{out}' cannot be created: '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{flag} '{out}' cannot be written: no permission to write to '{existing}'")
    return out


def load_model_tensors(folder) -> dict[str, np.ndarray]:
    """Load all weights of an HF model folder as NumPy arrays (stored dtypes kept).

    ``model.safetensors`` is preferred when present (as transformers does), else
    ``model.safetensors.index.json`` and its shards. Anything else raises
    :class:`CheckpointError` naming the folder and what it looked for.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder '{folder}' does not exist or is not a folder")
    if (folder / WEIGHTS_NAME).is_file():
        return read_weights(folder / WEIGHTS_NAME)
    if (folder / INDEX_NAME).is_file():
        return _load_sharded(folder, folder / INDEX_NAME)
    message = f"model folder '{folder}' has neither {WEIGHTS_NAME} nor {INDEX_NAME}"
    if any((folder / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        message += (" (it has pytorch_model.bin, which is not supported: convert it to "
                    "safetensors, e.g. load it in transformers and save_pretrained it)")
    raise CheckpointError(message)


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in the given key order, as transformers does; a tensor larger
    than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def _remove(paths) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def save_model_tensors(folder, tensors: dict, max_shard_bytes: int | None = None) -> None:
    """Save ``tensors`` (NumPy or CuPy arrays) as the weights of an HF model folder.

    Writes ``model.safetensors`` when ``max_shard_bytes`` is None or the total
    fits in it; otherwise shards ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (metadata ``total_size``, the sum of the
    tensors' bytes). Every file is written atomically. Weight files of the
    other layout left by an earlier save are removed afterwards, since loaders
    prefer ``model.safetensors`` and would otherwise read stale weights.
    """
    if max_shard_bytes is not None and (
        not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool)
        or max_shard_bytes <= 0
    ):
        raise ConfigError(
            f"max_shard_bytes must be a positive int or None, got {max_shard_bytes!r}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {key: to_numpy(value) for key, value in tensors.items()}
    sizes = {key: int(a.nbytes) for key, a in arrays.items()}
    total = sum(sizes.values())
    old_shards = [p for p in folder.iterdir() if _SHARD_RE.fullmatch(p.name)]
    meta = {"format": "pt"}

    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(folder / WEIGHTS_NAME, arrays, meta)
        _remove([folder / INDEX_NAME, *old_shards])
        return

    plan = _plan_shards(sizes, max_shard_bytes)
    weight_map, written = {}, set()
    for i, keys in enumerate(plan, start=1):
        name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        write_safetensors(folder / name, {k: arrays[k] for k in keys}, meta)
        weight_map.update((k, name) for k in keys)
        written.add(name)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
    write_json(folder / INDEX_NAME, index)
    _remove([folder / WEIGHTS_NAME, *(p for p in old_shards if p.name not in written)])
