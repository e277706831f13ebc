"""Training checkpoints: everything needed to continue a run bit for bit.

Layout of ``output_dir`` (transformers' Trainer names its checkpoints the same way)::

    checkpoint-N/
      trainable.safetensors    the parameters of the optimizer's groups, by model name
      adapter/                 model.save_pretrained(...) for adapter models (PEFT layout)
      optimizer.safetensors    moment arrays, keys "group/index/name"
      optimizer.json           optimizer type and per-parameter step counts
      trainer_state.json       step, schedule, data cursor + data-order RNG state,
                               model.rng state (dropout), and the trainer's extras
    latest                     the name of the newest complete checkpoint (the one a resume
                               continues; the trainer never writes one with diverged weights)

Runs written before the checkpoints took transformers' name (``step-N/``) are still found
and resumed; their folders are pruned like the new ones.

Atomicity: a checkpoint is written into ``.checkpoint-N.tmp-XXXX`` in the same folder and
renamed to ``checkpoint-N`` only when complete (a rename within a folder is atomic), then
``latest`` is replaced atomically. A crash or error at any point (a full disk included:
:class:`CheckpointError`, one line) leaves the previous checkpoints and ``latest`` as they
were, and no half-written ``checkpoint-N``. Old checkpoints are pruned to the last K by first
renaming them to a temporary name, so a crash while deleting cannot leave a partial
``checkpoint-M`` behind either.

``trainable.safetensors`` is what :func:`load_checkpoint` restores from (in place, into
the model it is given, whatever the model class); ``adapter/`` is for the user: the
adapter as of that step, loadable with ``PeftModel.from_pretrained`` (a model with
``load_method_state(folder)`` also reads from it the state a method keeps outside its
parameters, such as the updates ReLoRA merged into the base weights).

The model's optional hooks (``save_pretrained``, ``load_method_state``, ``rng``) come from
a :class:`~minipeft.train.hooks.TrainingHooks`: the trainer passes its own as ``hooks=``;
without it they are looked up on ``model``.
"""
from __future__ import annotations

import copy
import errno
import os
import re
import secrets
import shutil
from pathlib import Path

import numpy as np

from ..backend import to_device, to_numpy
from ..errors import CheckpointError
from ..io.checkpoint import read_json, write_json
from ..io.safetensors import atomic_write, read_safetensors, write_safetensors
from .hooks import TrainingHooks

FORMAT = 1
LATEST = "latest"
PREFIX = "checkpoint-"  # transformers' name: checkpoint-N
_STEP_RE = re.compile(r"^(?:checkpoint|step)-(\d+)$")  # step-N: the layout of older runs
_TMP_RE = re.compile(r"^\.(?:checkpoint|step)-\d+\.(tmp|del)-")


def _jsonable(obj):
    """json's fallback for NumPy values (an MT19937 state holds an array)."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _write_json(path: Path, obj) -> None:
    write_json(path, obj, indent=1, sort_keys=True, default=_jsonable)


def _param_names(model, groups) -> list[tuple[str, object]]:
    """(name, Parameter) for every group parameter: the model's dotted name, else "group/index"."""
    by_id = {id(p): n for n, p in model.named_parameters()} if hasattr(model, "named_parameters") else {}
    return [(by_id.get(id(p), f"{g.name}/{i}"), p) for g in groups for i, p in enumerate(g.params)]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, folder), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p.name.startswith(PREFIX), p) for p in output_dir.iterdir()
             if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [(step, p) for step, _, p in sorted(found)]  # checkpoint-N after an old step-N of the same N


def find_latest_checkpoint(output_dir) -> Path | None:
    """The folder ``latest`` names, or (if that is missing) the highest ``checkpoint-N``; None if none."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _STEP_RE.match(name) and (output_dir / name / "trainer_state.json").is_file():
            return output_dir / name
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prepare_output_dir(output_dir) -> Path:
    """Create the run folder ``output_dir``; a path that is a file, lies inside a file, or cannot
    be written to is a CheckpointError naming ``output_dir`` (before any work is done)."""
    out = Path(output_dir)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"lies inside '{parent}', which is a file"
            raise CheckpointError(f"output_dir='{out}' {where}, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"output_dir='{out}' cannot be written to ({exc.strerror or exc})") from None
    return out


def save_checkpoint(output_dir, step: int, *, model, groups, optimizer, schedule, loader,
                    keep: int | None = None, extra: dict | None = None,
                    hooks: TrainingHooks | None = None) -> Path:
    """Write ``output_dir/checkpoint-{step}`` atomically, point ``latest`` at it, keep the last ``keep``.

    An OSError while writing (a full disk, a folder that became read-only) is a
    :class:`CheckpointError` naming the checkpoint; the checkpoints already there are untouched."""
    output_dir = Path(output_dir)
    try:
        return _save_checkpoint(output_dir, step, model=model, groups=groups, optimizer=optimizer,
                                schedule=schedule, loader=loader, keep=keep, extra=extra,
                                hooks=TrainingHooks.of(model) if hooks is None else hooks)
    except OSError as exc:
        what = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        kept = find_latest_checkpoint(output_dir)
        raise CheckpointError(f"could not write checkpoint '{output_dir / f'{PREFIX}{step}'}': {what}"
                              + (f"; '{kept}' is kept as it was" if kept is not None else "")) from None


def _save_checkpoint(output_dir: Path, step: int, *, model, groups, optimizer, schedule, loader, keep, extra,
                     hooks: TrainingHooks) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.iterdir():  # left by a run killed mid-write
        if _TMP_RE.match(stale.name) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: that makes it 0700, this follows the umask like any folder
    try:
        write_safetensors(tmp / "trainable.safetensors", {n: p.data for n, p in _param_names(model, groups)})
        if hooks.parameter_groups and hooks.save_pretrained:  # an adapter model
            hooks.save_pretrained(tmp / "adapter")
        opt = optimizer.state_dict()
        arrays = {f"{key}/{name}": v for key, s in opt["state"].items() for name, v in s.items() if name != "step"}
        write_safetensors(tmp / "optimizer.safetensors", arrays)
        _write_json(tmp / "optimizer.json", {"type": opt["type"],
                                              "steps": {k: s["step"] for k, s in opt["state"].items()}})
        _write_json(tmp / "trainer_state.json", {
            "format": FORMAT, "step": step, "schedule": schedule.state_dict(), "data": loader.state_dict(),
            "model_rng": hooks.rng.bit_generator.state if hooks.rng is not None else None,
            "extra": extra or {}})
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step: move the old one aside first
            os.replace(final, output_dir / f".{PREFIX}{step}.del-{os.getpid()}")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(output_dir / LATEST, lambda f: f.write(f"{final.name}\n".encode()))
    _fsync_dir(output_dir)
    if keep:
        for old_step, old in list_checkpoints(output_dir)[:-keep]:
            trash = output_dir / f".{old.name}.del-{os.getpid()}"
            os.replace(old, trash)  # never a half-deleted checkpoint-M
            shutil.rmtree(trash, ignore_errors=True)
    for trash in output_dir.iterdir():
        if _TMP_RE.match(trash.name) and ".del-" in trash.name:
            shutil.rmtree(trash, ignore_errors=True)
    return final


def load_checkpoint(folder, *, model, groups, optimizer, schedule, loader,
                    hooks: TrainingHooks | None = None) -> dict:
    """Restore a checkpoint in place; returns its trainer state (``step``, ``extra``, ...).

    Every file is read and checked before the model is touched: on a bad checkpoint the
    model keeps its weights and a CheckpointError names the file and key at fault.
    """
    folder = Path(folder)
    hooks = TrainingHooks.of(model) if hooks is None else hooks
    state = read_json(folder / "trainer_state.json", "trainer state")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"'{folder / 'trainer_state.json'}': format {state.get('format')!r}, "
                              f"this minipeft reads format {FORMAT}")
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"'{folder / 'trainer_state.json'}': step must be an integer")
    weights = read_safetensors(folder / "trainable.safetensors")
    named = _param_names(model, groups)
    source = f"'{folder / 'trainable.safetensors'}'"
    missing = [n for n, _ in named if n not in weights]
    unexpected = sorted(set(weights) - {n for n, _ in named})
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the parameter groups: missing {missing or 'none'}, "
                              f"unexpected {unexpected or 'none'}")
    for name, p in named:
        if tuple(weights[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"the parameter has shape {tuple(p.shape)}")

    opt_json = read_json(folder / "optimizer.json", "optimizer state")
    arrays = read_safetensors(folder / "optimizer.safetensors")
    opt_state: dict[str, dict] = {key: {"step": s} for key, s in opt_json.get("steps", {}).items()}
    for full, array in arrays.items():
        key, _, name = full.rpartition("/")
        if key not in opt_state:
            raise CheckpointError(f"'{folder / 'optimizer.safetensors'}': array {full!r} has no step count "
                                  "in optimizer.json")
        opt_state[key][name] = array
    optimizer.load_state_dict({"type": opt_json.get("type"), "state": opt_state},
                              source=f"'{folder / 'optimizer.safetensors'}'")
    schedule.load_state_dict(state.get("schedule") or {}, source=f"'{folder / 'trainer_state.json'}' schedule")
    loader.load_state_dict(state.get("data") or {}, source=f"'{folder / 'trainer_state.json'}' data cursor")
    rng, rng_state = hooks.rng, state.get("model_rng")
    if rng is not None and rng_state is not None:
        try:  # check on a scratch generator before touching the model's
            type(rng.bit_generator)().state = copy.deepcopy(rng_state)
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"'{folder / 'trainer_state.json'}': model_rng does not fit "
                                  f"{type(rng.bit_generator).__name__} ({exc})") from None

    # everything checked: now change the model; first the state a method keeps outside its parameters
    # (ReLoRA's merged updates, DyLoRA's rank), which checks its own files before it changes anything
    if hooks.load_method_state and (folder / "adapter").is_dir():
        hooks.load_method_state(folder / "adapter")
    for name, p in named:
        p.data = to_device(np.array(to_numpy(weights[name]), dtype=p.dtype), p.device)
        p.grad = None
    if rng is not None and rng_state is not None:
        rng.bit_generator.state = copy.deepcopy(rng_state)
    return state
