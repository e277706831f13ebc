"""The weight difference ΔW of a targeted Linear: the one representation that Child-tuning F / D
(Xu et al., 2021, arXiv:2109.05687) and FishMask (Sung et al., 2021, arXiv:2111.09839) train.

Both papers update a chosen subset of the pretrained weights in place. minipeft's base weights
stay frozen instead, so each adapter holds a trainable difference ΔW and the layer computes

    y = x Wᵀ + b + x ΔWᵀ = x (W + ΔW)ᵀ + b          W: (out, in), read, never copied or written

ΔW is stored in one of two ways (per adapter, per layer):

    dense   ΔW (out, in), every entry a parameter                     (Child-tuning F)
    sparse  M = (i_1 < … < i_k) flat indices into W.reshape(-1), int64, fixed;
            v (k,) the parameter; ΔW = scatter(M, v), zero elsewhere    (Child-tuning D, FishMask)

so for the sparse form ∂L/∂v = (∂L/∂ΔW).reshape(-1)[M]: the dense gradient gathered at the mask,
and the optimizer holds k moments, never a dense copy. Entries outside M cannot move at all:
whatever the optimizer, its weight decay or the number of steps.

Parameters: out·in per layer (dense); k_layer, the layer's share of the mask (sparse).
Identity at init: ΔW = 0 (zeros; an empty or not-yet-chosen mask is zero too).
Merge: W ← W + ΔW (dense add, or an add at the k indices); unmerge subtracts it again.

Files (PEFT's layout under the method's own peft_type; PEFT has neither method):
``base_model.model.<module>.delta_weight`` (out, in) for a dense ΔW;
``<module>.delta_indices`` (k,) int64 and ``<module>.delta_values`` (k,) for a sparse one.
:func:`read_weights` checks every key, shape, dtype and index range first and names the file and
key at fault (CheckpointError). A *mask file* (:func:`save_mask`) holds the ``delta_indices`` only,
for reuse (the configs' ``mask_path``) and for resuming a run (its mask must exist before the
checkpoint's values can be restored into parameters of the right sizes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...autograd.fused import linear
from ...autograd.function import Function
from ...backend import get_array_module, to_device, to_numpy
from ...errors import CheckpointError
from ...io import read_safetensors, write_safetensors
from ...nn import Parameter
from ..core.base import AdapterLayer, ParameterDict
from ..core.names import PREFIX, WEIGHTS_NAME

PLACEHOLDER, FISHER, FILE = "placeholder", "fisher", "file"  # where a sparse adapter's mask came from


class MaskFromFile:
    """What the configs of the masked methods (Child-tuning D, FishMask) share: ``mask_path`` names
    a file to take M from when the adapter is built, and is never saved or reloaded (the adapter
    file holds M itself, and a checkpoint's path may be gone by then). Mixed in before PeftConfig."""

    def for_loading(self):
        return self.replace(mask_path=None)  # a loaded adapter brings its own mask

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["mask_path"] = None
        return out


class ScatterFlat(Function):
    # ΔW = zeros(shape) with ΔW.flat[M] = v;  d(ΔW)/dv: the gradient gathered at M (M holds no repeats)
    def forward(self, values, indices, shape):
        self.save(indices)
        out = get_array_module(values).zeros(int(np.prod(shape)), dtype=values.dtype)
        out[indices] = values
        return out.reshape(shape)

    def backward(self, g):
        (indices,) = self.saved
        return g.reshape(-1)[indices]


class DeltaLinear(AdapterLayer):
    """A Linear with a trainable ΔW per adapter, dense (``delta_weight``) or sparse (``delta_values``
    at the fixed ``delta_indices``)."""

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.delta_weight = ParameterDict()  # dense adapters: name -> ΔW (out, in)
        self.delta_values = ParameterDict()  # sparse adapters: name -> v (k_layer,)
        self.delta_indices: dict[str, np.ndarray] = {}  # sparse: name -> M, host int64, sorted
        self.mask_source: dict[str, str] = {}  # sparse: name -> PLACEHOLDER / FISHER / FILE
        self._on_device: dict = {}  # (name, device) -> M on that device (not re-sent every forward)

    @property
    def size(self) -> int:
        return int(self.base_layer.weight.size)

    def add_dense(self, name: str) -> Parameter:
        w = self.base_layer.weight
        self.delta_weight[name] = Parameter(get_array_module(w.data).zeros(w.shape, dtype=w.dtype))
        return self.delta_weight[name]

    def add_sparse(self, name: str, indices, source: str) -> Parameter:
        w = self.base_layer.weight
        self.delta_values[name] = Parameter(get_array_module(w.data).zeros(0, dtype=w.dtype))
        self.set_mask(name, indices, source)
        return self.delta_values[name]

    def set_mask(self, name: str, indices, source: str) -> None:
        """Fix M (sorted, unique, in range: checked by the callers) and restart v at zero, in the same
        Parameter object (the optimizer's groups hold it; its state starts at the first step)."""
        v = self.delta_values[name]
        self.delta_indices[name] = np.asarray(indices, dtype=np.int64)
        v.data = get_array_module(v.data).zeros(len(indices), dtype=v.dtype)
        v.grad = None
        self.mask_source[name] = source
        self._on_device = {k: a for k, a in self._on_device.items() if k[0] != name}

    def is_sparse(self, name: str) -> bool:
        return name in self.delta_values

    def adapter_names(self) -> list[str]:
        return self.delta_weight.keys() + self.delta_values.keys()

    def adapter_state(self, name: str) -> dict:
        if self.is_sparse(name):
            return {"delta_values": self.delta_values[name]}  # delta_indices is added when saving
        return {"delta_weight": self.delta_weight[name]}

    def delete_adapter(self, name: str) -> None:
        for table in (self.delta_weight, self.delta_values):
            if name in table:
                del table[name]
        self.delta_indices.pop(name, None)
        self.mask_source.pop(name, None)
        self._on_device = {k: a for k, a in self._on_device.items() if k[0] != name}

    def indices_on(self, name: str, device: str):
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = to_device(self.delta_indices[name], device)
        return self._on_device[key]

    # ----- the equation: ΔW in one place, then y = base(x) + x ΔWᵀ ------------------------------
    def delta(self, name: str):
        """ΔW (out, in) as a Tensor of the adapter's parameter (differentiable)."""
        if not self.is_sparse(name):
            return self.delta_weight[name]
        v = self.delta_values[name]
        return ScatterFlat.apply(v, indices=self.indices_on(name, v.device), shape=self.base_layer.weight.shape)

    def adapter_forward(self, name, x, result):
        return result + linear(x, self.delta(name))  # x ΔWᵀ, (…, out): W itself is never copied

    # ----- merge: W ← W + ΔW, unmerge W ← W − ΔW ---------------------------------------------
    def merge_into(self, name, weight):
        return self._add(name, weight, 1)

    def unmerge_from(self, name, weight, keep=False):
        return self._add(name, weight, -1)

    def _add(self, name, weight, sign):
        if not self.is_sparse(name):
            return weight + sign * self.delta_weight[name].data.astype(weight.dtype)
        out = weight.copy()
        flat = out.reshape(-1)
        flat[self.indices_on(name, self.delta_values[name].device)] += sign * self.delta_values[name].data.astype(
            weight.dtype)
        return out


# ----- a sparse adapter's mask across its layers ------------------------------------------------
def sparse_layers(peft_model, name: str) -> list[tuple[str, DeltaLinear]]:
    """(path, layer) of every DeltaLinear holding sparse adapter ``name``, in model order."""
    return [(p, m) for p, m in peft_model.adapter_layers(name, DeltaLinear) if m.is_sparse(name)]


def split_global(chosen: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Sorted global flat indices into the concatenation of the layers' W.reshape(-1) -> each
    layer's own flat indices."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cuts = np.searchsorted(chosen, bounds)
    return [chosen[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(sizes))]


def placeholder_mask(sizes: list[int], k: int) -> list[np.ndarray]:
    """The mask before calibration: k entries spread evenly over all targeted weights (global
    index ⌊j·n/k⌋, j < k), so an uncalibrated adapter has the count and reach of a real one."""
    n = int(sum(sizes))
    return split_global((np.arange(k, dtype=np.int64) * n) // max(k, 1), sizes)


def set_masks(peft_model, name: str, masks: list[np.ndarray], source: str) -> None:
    for (_, layer), indices in zip(sparse_layers(peft_model, name), masks):
        layer.set_mask(name, indices, source)


def mask_sources(peft_model, name: str) -> set[str]:
    return {layer.mask_source[name] for _, layer in sparse_layers(peft_model, name)}


# ----- files -------------------------------------------------------------------------------------
def saved_tensors(peft_model, name: str, tensors: dict) -> dict:
    """The method rows' ``saved_tensors``: each sparse layer's M written beside its v."""
    out = dict(tensors)
    for path, layer in sparse_layers(peft_model, name):
        out[f"{PREFIX}{path}.delta_indices"] = layer.delta_indices[name].astype(np.int64)
    return out


def save_mask(peft_model, path, adapter_name: str = "default") -> None:
    """Write adapter ``adapter_name``'s mask (``<module>.delta_indices`` per layer) to ``path``, for
    reuse through the config's ``mask_path``."""
    write_safetensors(Path(path), saved_tensors(peft_model, adapter_name, {}), metadata={"format": "pt"})


def checked_mask(tensors: dict, layers: list[tuple[str, DeltaLinear]], source: str) -> list[np.ndarray]:
    """Each layer's ``delta_indices`` from ``tensors``, checked: present, 1-D integers, strictly
    increasing (sorted, no repeats), inside [0, out·in). CheckpointError names ``source`` and the key."""
    masks = []
    for path, layer in layers:
        key = f"{PREFIX}{path}.delta_indices"
        if key not in tensors:
            raise CheckpointError(f"'{source}' does not fit the model: missing key {key}")
        m = np.asarray(to_numpy(tensors[key]))
        if m.ndim != 1 or not np.issubdtype(m.dtype, np.integer):
            raise CheckpointError(f"'{source}': {key} must be a 1-D integer array, got {m.dtype} {m.shape}")
        if m.size and (m[0] < 0 or m[-1] >= layer.size or np.any(np.diff(m) <= 0)):
            raise CheckpointError(f"'{source}': {key} must hold increasing flat indices in [0, {layer.size}) "
                                  f"(the weight is {tuple(layer.base_layer.weight.shape)}), got values from "
                                  f"{m.min()} to {m.max()}{' with repeats or out of order' if m.size > 1 else ''}")
        masks.append(m.astype(np.int64))
    return masks


def read_mask(path, layers, expected: int | None = None) -> list[np.ndarray]:
    """The mask in ``path`` (a mask file or an adapter file) for ``layers``, checked; ``expected``:
    the number of entries the config keeps."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"mask file '{path}' does not exist")
    masks = checked_mask(read_safetensors(path), layers, str(path))
    total = sum(len(m) for m in masks)
    if expected is not None and total != expected:
        raise CheckpointError(f"'{path}': the mask holds {total} entries, the config keeps {expected} "
                              "(was it made for another base model, target_modules or ratio?)")
    return masks


def read_weights(peft_model, name: str, folder) -> None:
    """The method rows' ``read_folder_weights``: adapter ``name`` from ``folder``, every key, shape
    and index checked before anything changes (PEFT's strictness: nothing missing, nothing extra)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"adapter file '{path}' does not exist")
    tensors = read_safetensors(path)
    layers = [(p, m) for p, m in peft_model.adapter_layers(name, DeltaLinear)]
    sparse = [(p, m) for p, m in layers if m.is_sparse(name)]
    masks = checked_mask(tensors, sparse, str(path))
    mask_of = {p: m for (p, _), m in zip(sparse, masks)}
    expected, arrays = {f"{PREFIX}{p}.delta_indices" for p in mask_of}, {}
    for path_, layer in layers:
        if layer.is_sparse(name):
            key, shape = f"{PREFIX}{path_}.delta_values", (len(mask_of[path_]),)
        else:
            key, shape = f"{PREFIX}{path_}.delta_weight", tuple(layer.base_layer.weight.shape)
        expected.add(key)
        if key not in tensors:
            raise CheckpointError(f"adapter file '{path}' does not fit the model: missing key {key}")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"adapter file '{path}' does not fit the model: tensor {key!r} has shape "
                                  f"{tuple(tensors[key].shape)}, the model expects {shape}")
        arrays[key] = tensors[key]
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"adapter file '{path}' does not fit the model: unexpected keys {unexpected[:5]}")
    if sparse:
        keeps = peft_model.peft_config[name].mask_size(sum(layer.size for _, layer in sparse))
        if sum(len(m) for m in masks) != keeps:
            raise CheckpointError(f"adapter file '{path}': the mask holds {sum(len(m) for m in masks)} entries, "
                                  f"the config keeps {keeps} (another base model or ratio?)")
    set_masks(peft_model, name, masks, FILE)
    for path_, layer in layers:
        p, key = (layer.delta_values[name], f"{PREFIX}{path_}.delta_values") if layer.is_sparse(name) else \
            (layer.delta_weight[name], f"{PREFIX}{path_}.delta_weight")
        p.data = to_device(np.asarray(arrays[key], dtype=p.dtype), p.device)


def load_mask_state(peft_model, name: str, folder) -> None:
    """The method rows' ``load_extra`` (on resume): the mask of ``folder``'s adapter file; the
    trainer then restores the values into parameters of those sizes."""
    path = Path(folder) / WEIGHTS_NAME
    layers = sparse_layers(peft_model, name)
    if layers and path.is_file():
        set_masks(peft_model, name, checked_mask(read_safetensors(path), layers, str(path)), FILE)
