"""Read and write the safetensors format, with errors that say what is wrong.

The format (https://github.com/huggingface/safetensors) is::

    [8 bytes]  N, the header length, unsigned 64-bit little-endian
    [N bytes]  UTF-8 JSON: {"__metadata__": {str: str},
                            name: {"dtype": "F32", "shape": [...],
                                   "data_offsets": [begin, end]}, ...}
    [rest]     the data buffer; offsets are relative to its start

Tensors are stored C-contiguous and little-endian. We implement it ourselves,
rather than importing the ``safetensors`` package, so the reader sees every
byte and can name the file and key at fault when a file is corrupt or
truncated; the tests use the package as an oracle in both directions. The reader is at
least as strict as the reference one: strict JSON (no NaN, no lone surrogates), and the
tensors tile the data section exactly (no overlap, no gap, nothing after the last), since
anything else is a file whose loads would be silently wrong.

The reader maps the file copy-on-write (``mmap.ACCESS_COPY``) and returns NumPy
views into the mapping: nothing is read until used, and nothing is copied. The views
are writable, because parameters are changed in place (optimizer steps, a LoRA merge
``W += ΔW``), but a write only copies that page into this process's memory: the file
on disk never changes. (``read_safetensors(path, mmap=False)`` reads the file into one
buffer instead; so it does by default on Windows, which cannot delete or replace a mapped
file.) Like every memory-mapped loader (the ``safetensors`` package too), this trusts that
no one truncates the file while it is mapped; our own writer replaces files by renaming
(:func:`atomic_write`), so saving over a loaded model is safe.

The writer orders tensors in the data buffer by item size (largest first), then by
name, as the reference writer does: with the header padded to a multiple of 8 bytes
this keeps every tensor aligned to its item size, so readers can view the bytes
without copying.
"""
from __future__ import annotations

import json
import math
import mmap as _mmap
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np

from ..backend import to_numpy
from ..errors import CheckpointError

# safetensors dtype name -> NumPy dtype (BF16 via ml_dtypes, as NumPy has none)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_SUPPORTED = ", ".join(DTYPES)
_ALIGN = 8  # the reference writer pads the header to a multiple of 8 bytes
_MAX_HEADER = 100_000_000  # the reference reader's limit; guards huge allocations
_MAX_ARRAY_BYTES = 2 ** 62  # below NumPy's limit (the size in bytes must fit an int64)


class TensorInfo(NamedTuple):
    """One header entry: dtype name, shape, and [begin, end) in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _fail(path, message: str, key: str | None = None) -> CheckpointError:
    where = f"{path}" if key is None else f"{path}, tensor {key!r}"
    return CheckpointError(f"safetensors file '{where}': {message}")


def _no_duplicates(pairs):
    """json object hook: a repeated tensor name would silently drop a tensor (the reference
    reader keeps the last one; we refuse)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str):
    """json hook: NaN / Infinity are Python's extension, not JSON; the reference refuses them."""
    raise ValueError(f"{name} is not a JSON value")


def _parse_entry(path, key, entry, buffer_size: int) -> TensorInfo:
    """Validate one header entry against the data buffer; return its TensorInfo."""
    if not isinstance(entry, dict):
        raise _fail(path, f"expected an object with dtype/shape/data_offsets, got {entry!r}", key)
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise _fail(path, f"header entry has no {field!r} field", key)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"unsupported dtype {dtype!r}; supported: {_SUPPORTED}", key)

    def is_uint(v):  # bool is an int subclass in Python, but not a size
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(shape, list) or not all(is_uint(d) for d in shape):
        raise _fail(path, f"shape must be a list of non-negative ints, got {shape!r}", key)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_uint, offsets))):
        raise _fail(path, f"data_offsets must be [begin, end] ints >= 0, got {offsets!r}", key)
    # numpy refuses an array whose non-zero dimensions multiply past its index range,
    # even when another dimension is 0 (so the tensor holds no bytes)
    if math.prod(max(d, 1) for d in shape) * DTYPES[dtype].itemsize >= _MAX_ARRAY_BYTES:
        raise _fail(path, f"shape {shape} has dimensions too large for an array", key)
    begin, end = offsets
    if begin > end:
        raise _fail(path, f"data_offsets begin {begin} is after end {end}", key)
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise _fail(
            path,
            f"data_offsets [{begin}, {end}] span {end - begin} bytes but shape {shape} "
            f"of {dtype} needs {expected}",
            key,
        )
    if end > buffer_size:
        raise _fail(
            path,
            f"file is truncated: tensor {key!r} needs bytes up to {end} but the data "
            f"section has {buffer_size}",
            key,
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _read_header(path, f) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate the header of the open file; return it and the buffer start."""
    file_size = os.fstat(f.fileno()).st_size
    if file_size < 8:
        raise _fail(path, f"file has {file_size} bytes, expected at least 8 (the header length)")
    n = int.from_bytes(f.read(8), "little")
    if n > file_size - 8 or n > _MAX_HEADER:
        raise _fail(path, f"header length {n} is larger than the {file_size - 8} bytes after it")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(path, f"header is not valid UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise _fail(path, "header is JSON nested too deeply to be a safetensors header") from None
    try:  # a lone surrogate escape ("\ud800") is valid to Python's parser, but not text
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _fail(path, f"header holds a lone surrogate escape ({exc.object[exc.start:exc.end]!r}), "
                          "which is not text") from None
    if not isinstance(header, dict):
        raise _fail(path, f"header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is allowed, [] or "" are not (as the reference)
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must be an object of string -> string")
    buffer_size = file_size - 8 - n
    infos = {key: _parse_entry(path, key, entry, buffer_size) for key, entry in header.items()}
    _check_tiling(path, infos, buffer_size)
    return infos, metadata, 8 + n


def _check_tiling(path, infos: dict[str, TensorInfo], buffer_size: int) -> None:
    """The tensors must cover the data section exactly, as the reference reader demands:
    sorted by offsets, each begins where the one before ended, the last ends at the end.
    Otherwise two names could alias the same bytes (overlap), or bytes inserted into the
    file (a gap, junk at the end) would shift or hide data, and a load would be silently
    wrong rather than refused."""
    position, previous = 0, None
    for key, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            if info.begin < position:
                problem = f"overlaps tensor {previous!r} (it begins at byte {info.begin}, before {position})"
            else:
                problem = (f"begins at byte {info.begin}, but the tensor before it ends at {position} "
                           f"({info.begin - position} bytes between them belong to no tensor)")
            raise _fail(path, f"data_offsets [{info.begin}, {info.end}] {problem}", key)
        position, previous = info.end, key
    if position != buffer_size:
        raise _fail(path, f"the tensors cover {position} bytes of the data section, but it has {buffer_size} "
                          f"({buffer_size - position} bytes at its end belong to no tensor)")


def _open(path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"safetensors file '{path}' does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"safetensors file '{path}' is a folder, expected a file") from None
    except OSError as exc:  # no permission, an I/O error ...
        raise CheckpointError(f"safetensors file '{path}' cannot be read: {exc.strerror or exc}") from None


def read_safetensors_header(path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read only the header: ``({name: TensorInfo}, metadata)``, fully validated.

    Raises :class:`CheckpointError` naming the file (and key) for any malformed,
    unsupported or truncated entry.
    """
    with _open(path) as f:
        infos, metadata, _ = _read_header(path, f)
    return infos, metadata


# Windows refuses to delete or replace a file while it is mapped (checkpoint rotation, saving
# over a loaded model): there the reader reads into memory instead.
_MAP_BY_DEFAULT = os.name != "nt"


def read_safetensors(path, mmap: bool = _MAP_BY_DEFAULT) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file as a NumPy array of its stored dtype.

    F64/F32/F16 become NumPy floats, BF16 becomes ``ml_dtypes.bfloat16``, the
    integer types and BOOL their NumPy twins. Each array is a writable view: with
    ``mmap`` (the default, except on Windows) into a private copy-on-write mapping of the file (pages are
    read when touched, copied only when written, never written back), else into one
    buffer the data section is read into. The arrays keep their mapping or buffer
    alive. A tensor at an offset that is not a multiple of its item size (possible in
    files from other writers) is copied so that every returned array is aligned.
    """
    with _open(path) as f:
        infos, _, start = _read_header(path, f)
        size = os.fstat(f.fileno()).st_size
        if mmap:
            try:  # the mapping holds its own handle: closing the file leaves it valid
                buffer = _mmap.mmap(f.fileno(), size, access=_mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise _fail(path, f"cannot be mapped into memory: {getattr(exc, 'strerror', None) or exc}") from None
        else:
            f.seek(start)
            buffer = bytearray(size - start)
            try:
                got = f.readinto(buffer)
            except OSError as exc:
                raise _fail(path, f"cannot be read: {exc.strerror or exc}") from None
            if got != len(buffer):  # the file shrank between fstat and read
                raise _fail(path, f"file is truncated: read {got} of {len(buffer)} data bytes")
            start = 0  # the buffer holds the data section only
    tensors = {}
    for key, info in infos.items():
        dtype = DTYPES[info.dtype]
        count = math.prod(info.shape)
        array = np.frombuffer(buffer, dtype=dtype, count=count, offset=start + info.begin)
        if sys.byteorder == "big":  # the file is little-endian
            array = array.byteswap()
        array = array.reshape(info.shape)
        tensors[key] = array if array.flags.aligned else array.copy()
    return tensors


def check_finite_floats(path, tensors: dict, keys=None) -> None:
    """Refuse weights that are not finite floating-point numbers, naming file and key.

    Model and adapter weights are floats: an integer or BOOL tensor in their place would
    be cast silently to a meaningless weight, and a NaN or Inf makes every logit NaN (the
    model then "generates" nothing, and a merge writes NaN weights). ``keys`` limits the
    check to those tensors (default: all). One vectorised ``isfinite`` pass per tensor.
    """
    for key in tensors if keys is None else keys:
        array = tensors[key]
        if array.dtype.kind != "f" and array.dtype != DTYPES["BF16"]:
            raise _fail(path, f"has dtype {_NAMES.get(array.dtype, array.dtype)}, but weights must be "
                              "floating point (F32, F16, BF16 or F64)", key)
        finite = np.isfinite(array)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise _fail(path, f"holds {int(finite.size - finite.sum())} non-finite values "
                              f"({array[where]} at index {list(where)}); weights must be finite", key)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path, write: Callable) -> None:
    """Create ``path`` by calling ``write(file)`` on a temporary file, then renaming.

    The temporary file lives in the same folder (a rename is atomic only within
    one file system) and is fsynced before :func:`os.replace`, so a reader or a
    crash sees either the old file or the complete new one, never a partial
    file. On any error the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # persist the rename itself; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _prepare(path, key, value) -> np.ndarray:
    """Return ``value`` as a C-contiguous, native-order NumPy array of a supported dtype."""
    if not isinstance(key, str) or key == "__metadata__":
        raise CheckpointError(f"cannot write '{path}': tensor name {key!r} must be a string "
                              "other than '__metadata__'")
    array = to_numpy(value)
    if array.dtype.byteorder not in "=|":  # e.g. '>f4' from a big-endian source
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype not in _NAMES:
        raise CheckpointError(
            f"cannot write '{path}': tensor {key!r} has dtype {array.dtype}, "
            f"supported: {_SUPPORTED} (bfloat16 via ml_dtypes)"
        )
    # not np.ascontiguousarray: it turns a 0-d scalar into shape (1,)
    return array if array.flags.c_contiguous else array.copy(order="C")


def write_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (NumPy or CuPy arrays) to ``path`` in the safetensors format.

    The header is compact JSON with ``__metadata__`` first and names sorted,
    padded with spaces to a multiple of 8 bytes. In the data buffer tensors are
    ordered by item size (largest first), then name, which keeps each one aligned
    (see the module docstring). The file is written atomically (:func:`atomic_write`).
    """
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointError(f"cannot write '{path}': metadata must map str -> str")
    arrays = {key: _prepare(path, key, value) for key, value in tensors.items()}
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    entries, offset = {}, 0
    for key in order:
        a = arrays[key]
        entries[key] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header = {"__metadata__": metadata} if metadata else {}
    header.update((key, entries[key]) for key in sorted(entries))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGN)

    def write(f):
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key in order:
            a = arrays[key]
            if sys.byteorder == "big":
                a = a.byteswap()
            f.write(a.reshape(-1).view(np.uint8))  # raw bytes, no extra copy

    atomic_write(path, write)
