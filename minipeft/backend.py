"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU, one code path.

This is the only module that imports CuPy. Everything else asks for the array
module of the data it holds (``xp = get_array_module(x)``) and calls NumPy's API
on it, which CuPy mirrors. The few places where the two libraries differ live
here, each with a test:

* **scatter-add** (the backward of an embedding lookup): NumPy has
  ``np.add.at``; CuPy has ``cupyx.scatter_add``.
* **out-of-range indices**: NumPy raises ``IndexError`` but CuPy silently wraps
  them around, so :func:`check_index_range` validates ids before any lookup.
* **random numbers**: NumPy and CuPy generators give different streams for the
  same seed. minipeft draws every random number on the host from an explicit
  ``numpy.random.Generator`` and then moves it to the device, so a seed means
  the same numbers on both backends.
"""
from __future__ import annotations

import numpy as np

from .errors import DeviceError, InputError

CPU = "cpu"
CUDA = "cuda"

_cupy = None  # the cupy module once imported; set only by _import_cupy


def _import_cupy():
    """Import CuPy on first use, with an error that says how to get it."""
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: PLC0415 - the one import of cupy in the project
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise DeviceError(
                "device 'cuda' needs CuPy: pip install 'minipeft[gpu]' (cupy-cuda12x)"
            ) from exc
        _cupy = cupy
    return _cupy


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = _import_cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return False


def normalize_device(device: str) -> str:
    """Map user spellings ('cpu', 'cuda', 'cuda:0', 'gpu') to 'cpu' or 'cuda'."""
    name = str(device).lower()
    if name == CPU:
        return CPU
    if name in ("cuda", "gpu") or name.startswith("cuda:"):
        return CUDA
    raise DeviceError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def get_array_module(*arrays):
    """Return ``numpy`` or ``cupy``: the library that owns the given arrays."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def device_of(array) -> str:
    """'cuda' for a CuPy array, 'cpu' otherwise."""
    return CUDA if get_array_module(array) is not np else CPU


def to_device(array, device: str):
    """Return ``array`` on ``device`` (no copy when it is already there)."""
    device = normalize_device(device)
    if device == CPU:
        return to_numpy(array)
    cp = _import_cupy()
    return cp.asarray(array)


def to_numpy(array) -> np.ndarray:
    """Return a host NumPy array (copies from the GPU when needed)."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def scatter_add(target, indices, values) -> None:
    """In place: ``target[indices[i]] += values[i]``, accumulating repeated indices.

    Plain ``target[indices] += values`` would keep only one of the repeats.
    """
    xp = get_array_module(target)
    if xp is np:
        np.add.at(target, indices, values)
    else:
        import cupyx  # noqa: PLC0415 - ships with cupy

        cupyx.scatter_add(target, indices, values)


def check_index_range(indices, size: int, what: str) -> None:
    """Raise :class:`InputError` unless every index lies in ``[0, size)``.

    CuPy wraps out-of-range indices around instead of raising, which would turn
    a bad token id into a silently wrong embedding; this check runs on both
    backends so they behave the same.
    """
    xp = get_array_module(indices)
    if indices.size == 0:
        return
    low, high = int(xp.min(indices)), int(xp.max(indices))
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise InputError(f"{what}: id {bad} is out of range, expected 0 <= id < {size}")


def random_generator(seed) -> np.random.Generator:
    """A host NumPy generator; pass an int seed, a Generator, or None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def device_random(rng: np.random.Generator, draw, device: str):
    """Call ``draw(rng)`` on the host and move the result to ``device``.

    Drawing on the host keeps random streams identical across backends.
    """
    return to_device(draw(rng), device)
