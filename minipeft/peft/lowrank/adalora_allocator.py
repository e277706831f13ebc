"""AdaLoRA's rank allocator (Zhang et al., 2023, arXiv:2303.10512, §3.2–3.3 and Algorithm 1),
as Hugging Face PEFT 0.21's ``RankAllocator`` and ``update_and_allocate`` do it (REFERENCE 1.8).

Called once per optimizer update, after ``optimizer.step()`` and before ``zero_grad()`` (the
trainer's ``on_step_end(step)``, step = 0-based index of the update just made), with
T = total_step:

* step < T − tfinal: update the importance of every entry w of Q, E, P (eq. 8–10),
      I = |w ⊙ ∇w|,   Ī ← β1 Ī + (1 − β1) I,   Ū ← β2 Ū + (1 − β2) |I − Ī|,   s(w) = Ī · Ū
  (w is the weight *after* the update, ∇w the gradient the update used, as in PEFT), then,
  when the schedule says so, mask to the budget b(step).
* step = T − tfinal: mask to the final budget b = target_bgt with the scores so far, keep that
  ``rank_pattern`` as the final one, and drop the averages.
* step > T − tfinal: set the E's of the final pattern's pruned ranks to 0 again (the optimizer
  would otherwise let them grow back).

Budget (cubic schedule, eq. 11), init_bgt = Σ_layers init_r, target_bgt = target_r · #layers:

    b(t) = init_bgt                                               t ≤ tinit           (no mask)
    b(t) = target_bgt                                             t > T − tfinal      (mask)
    b(t) = ⌊(init_bgt − target_bgt) · (1 − (t − tinit)/(T − tfinal − tinit))³ + target_bgt⌋
                                                                  otherwise (mask if t % deltaT == 0)

Masking: the score of triplet i of a layer is S_i = s(E_i) + mean_j s(Q_ij) + mean_k s(P_ki)
(eq. 7); with every layer's scores pooled, threshold τ = the k-th smallest, k = init_bgt − b;
E_i ← 0 where S_i ≤ τ, and ``rank_pattern[layer] = [S_i > τ for each i]`` goes into the
adapter's config (so ``save_pretrained`` writes it, as PEFT's does). Ties at τ mask all tied
triplets, so with equal scores more than k can be masked (as ``kthvalue`` + ``≤`` in PEFT).

Departures from PEFT: k ≤ 0 (a budget not below init_bgt, e.g. target_r ≥ init_r) masks
nothing, where PEFT's ``kthvalue`` raises; a parameter without a gradient counts as ∇w = 0;
the averages live in the layers and, while the allocation runs, are saved beside the adapter
(``adalora_importance.safetensors``), so a resumed training checkpoint continues exactly
(PEFT keeps them in memory only); several trainable AdaLoRA adapters each get their own
allocation (PEFT allows one); an adapter loaded with a rank_pattern (already cropped) has
finished its allocation and is left alone.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ...backend import get_array_module, to_device, to_numpy
from ...errors import CheckpointError
from ...io import read_json, read_safetensors, write_safetensors
from ..core.base import layers_holding
from ..core.names import CONFIG_NAME

STATE_FILE = "adalora_importance.safetensors"  # the averages Ī, Ū while an allocation is under way


def adapted_layers(peft_model, name: str) -> list:
    """(path, AdaLoraLayer) for every layer holding adapter ``name``, in model order."""
    from .adalora import AdaLoraLayer  # noqa: PLC0415 - adalora.py imports this module

    return layers_holding(peft_model.get_base_model(), name, AdaLoraLayer)


def budget_schedule(step: int, init_bgt: int, target_bgt: int, config) -> tuple[int, bool]:
    """(b(step), mask now?): the cubic schedule above (PEFT's ``budget_schedule``)."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt), step % config.deltaT == 0


def update_importance(layer, name: str, beta1: float, beta2: float) -> None:
    """Ī ← β1 Ī + (1 − β1) |w ⊙ ∇w|,  Ū ← β2 Ū + (1 − β2) |I − Ī|  for Q, E and P."""
    averages = layer.importance.setdefault(name, {})
    for key, p in layer.adapter_state(name).items():
        xp = get_array_module(p.data)
        ipt = xp.abs(p.data * p.grad) if p.grad is not None else xp.zeros_like(p.data)
        ipt_bar, unc_bar = averages.get(key, (xp.zeros_like(p.data), xp.zeros_like(p.data)))
        ipt_bar = beta1 * ipt_bar + (1 - beta1) * ipt
        unc_bar = beta2 * unc_bar + (1 - beta2) * xp.abs(ipt - ipt_bar)  # the updated Ī, as PEFT
        averages[key] = (ipt_bar, unc_bar)


def triplet_scores(layer, name: str):
    """S_i = s(E_i) + (mean_j s(Q_ij) + mean_k s(P_ki)), shape (r,), with s = Ī · Ū."""
    s = {key: ipt_bar * unc_bar for key, (ipt_bar, unc_bar) in layer.importance[name].items()}
    return s["lora_E"].reshape(-1) + (s["lora_A"].mean(axis=1) + s["lora_B"].mean(axis=0))


def mask_to_budget(layers, name: str, init_bgt: int, budget: int) -> dict:
    """Zero E_i for the init_bgt − budget lowest triplet scores; the rank_pattern it leaves."""
    scores = {path: to_numpy(triplet_scores(layer, name)) for path, layer in layers}
    k = init_bgt - budget
    if k <= 0:
        threshold = -np.inf  # nothing to prune (PEFT's kthvalue would raise)
    else:
        pooled = np.concatenate(list(scores.values()))
        threshold = np.partition(pooled, k - 1)[k - 1]  # torch.kthvalue(pooled, k)
    pattern = {f"{path}.lora_E": tuple(bool(v) for v in scores[path] > threshold) for path, _ in layers}
    mask_with_pattern(layers, name, pattern)
    return pattern


def mask_with_pattern(layers, name: str, pattern: dict) -> None:
    """E_i ← 0 for every rank i the pattern prunes."""
    for path, layer in layers:
        E = layer.lora_E[name]
        xp = get_array_module(E.data)
        keep = xp.asarray(np.asarray(pattern[f"{path}.lora_E"], dtype=bool))[:, None]  # (r, 1)
        E.data = xp.where(keep, E.data, xp.zeros_like(E.data))


def update_and_allocate(peft_model, name: str, step: int) -> None:
    """PEFT's ``AdaLoraModel.update_and_allocate(global_step)`` for adapter ``name``."""
    config = peft_model.peft_config[name]
    layers = adapted_layers(peft_model, name)
    if any(layer.lora_A[name].shape[0] != config.init_r for _, layer in layers):
        return  # loaded with its ranks already cropped: its allocation is over
    init_bgt, target_bgt = config.init_r * len(layers), config.target_r * len(layers)
    final_step = config.total_step - config.tfinal
    if step < final_step:
        if step > 0 and any(name not in layer.importance for _, layer in layers):
            warnings.warn(f"AdaLoRA adapter {name!r}: importance averages start at step {step + 1}, not 1 "
                          f"(on_step_end was not called before, or a checkpoint without {STATE_FILE} was resumed)",
                          stacklevel=4)
        for _, layer in layers:
            update_importance(layer, name, config.beta1, config.beta2)
        budget, mask_now = budget_schedule(step, init_bgt, target_bgt, config)
        if mask_now:
            _set_pattern(peft_model, name, mask_to_budget(layers, name, init_bgt, budget))
    elif step == final_step:
        if any(name not in layer.importance for _, layer in layers):
            raise RuntimeError(f"AdaLoRA adapter {name!r}: no importance scores at the final allocation "
                               f"(step {step + 1}): on_step_end was not called on the earlier steps")
        budget, _ = budget_schedule(step, init_bgt, target_bgt, config)
        _set_pattern(peft_model, name, mask_to_budget(layers, name, init_bgt, budget))
        for _, layer in layers:
            layer.importance.pop(name, None)
    else:
        if config.rank_pattern is None:
            raise RuntimeError(f"AdaLoRA adapter {name!r}: no rank_pattern after the final allocation (step "
                               f"{final_step + 1}): on_step_end was not called on that step")
        mask_with_pattern(layers, name, config.rank_pattern)


def _set_pattern(peft_model, name: str, pattern: dict) -> None:
    """The config is frozen: the adapter gets a copy holding the new rank_pattern (PEFT assigns it)."""
    peft_model.peft_config[name] = peft_model.peft_config[name].replace(rank_pattern=pattern)


# ----- the allocator's state beside the adapter (the registry's save_extra / load_extra) -----------
def save_state(peft_model, name: str, folder) -> None:
    """While an allocation is under way, write the averages Ī, Ū to ``folder/adalora_importance.safetensors``
    (PEFT ignores the file), so a resumed run continues exactly; otherwise remove a stale one."""
    path = Path(folder) / STATE_FILE
    arrays = {f"{p}.{key}.{which}": array for p, layer in adapted_layers(peft_model, name)
              for key, pair in layer.importance.get(name, {}).items() for which, array in zip(("ipt", "unc"), pair)}
    if arrays:
        write_safetensors(path, arrays)
    elif path.exists():
        path.unlink()


def load_state(peft_model, name: str, folder) -> None:
    """Read back what :func:`save_state` and ``adapter_config.json`` hold: the averages and the
    rank_pattern so far (a resumed checkpoint's model starts without them). Checks before it changes."""
    folder, layers = Path(folder), adapted_layers(peft_model, name)
    config = peft_model.peft_config[name]
    if any(layer.lora_A[name].shape[0] != config.init_r for _, layer in layers):
        return  # cropped on loading: the allocation is over, nothing of it is needed
    pattern = read_json(folder / CONFIG_NAME, "adapter config", CheckpointError).get("rank_pattern") \
        if (folder / CONFIG_NAME).exists() else None
    if pattern is not None and (set(pattern) != {f"{p}.lora_E" for p, _ in layers}
                                or any(len(v) != config.init_r for v in pattern.values())):
        raise CheckpointError(f"'{folder / CONFIG_NAME}': its rank_pattern does not fit adapter {name!r} "
                              f"({len(layers)} layers of rank {config.init_r})")
    arrays = read_safetensors(folder / STATE_FILE) if (folder / STATE_FILE).exists() else {}
    expected = {f"{p}.{key}.{which}": param for p, layer in layers for key, param in layer.adapter_state(name).items()
                for which in ("ipt", "unc")}
    if arrays and (set(arrays) != set(expected)
                   or any(tuple(arrays[k].shape) != tuple(expected[k].shape) for k in expected)):
        raise CheckpointError(f"'{folder / STATE_FILE}' does not fit adapter {name!r}: expected the averages "
                              f"of {len(expected) // 2} parameters with the adapter's shapes")
    if pattern is not None:
        _set_pattern(peft_model, name, pattern)
    for p, layer in layers:
        layer.importance.pop(name, None)
        if arrays:
            layer.importance[name] = {key: tuple(to_device(np.asarray(arrays[f"{p}.{key}.{which}"], dtype=param.dtype),
                                                           param.device) for which in ("ipt", "unc"))
                                      for key, param in layer.adapter_state(name).items()}


def final_ranks(peft_model, name: str = "default") -> dict[str, int]:
    """{module path: kept rank}: from rank_pattern once ranks were allocated, else every rank."""
    pattern = peft_model.peft_config[name].rank_pattern or {}
    return {path: sum(pattern.get(f"{path}.lora_E", ())) if f"{path}.lora_E" in pattern
            else layer.lora_A[name].shape[0] for path, layer in adapted_layers(peft_model, name)}
