"""LoRAHub: compose K trained LoRA adapters for a new task with weights found without
gradients (Huang et al., 2023, arXiv:2307.13269; the paper's code is sail-sg/lorahub,
lorahub/algorithm.py; REFERENCE 2.7 and 1.13).

Adapters i = 1..K on the same layers, each with A_i (r, in), B_i (out, r) and scaling s_i,
and a weight vector w ∈ [−1.5, 1.5]^K give one LoRA adapter per layer (§3.2, eq. 2):

    A = Σ w_i A_i  (r, in),   B = Σ w_i B_i  (out, r),   ΔW = s · B A = s Σ_i Σ_j w_i w_j B_i A_j

The paper's code weights every tensor of the adapters' state dicts and loads the sum
into a model built with the first adapter's config, so the one s (= α/r, the same for all
K adapters: refused otherwise) multiplies the *product*; the i ≠ j cross terms make ΔW
quadratic in w and not Σ w_i s B_i A_i. ``exact=True`` realises the exact weighted sum of
the ΔW's instead, as concatenation (PEFT's ``cat``, combine.py):

    A = [w_1 s_1 A_1; ...; w_K s_K A_K]  (Σ r_i, in),   B = [B_1, ..., B_K]  (out, Σ r_i),
    s = 1,   ΔW = B A = Σ_i w_i s_i B_i A_i         (ranks and scalings may then differ).

Search (§3.3): minimise  L(w) + 0.05 · (1/K) Σ_i |w_i|  over the box, where L is the mean
loss on a few examples of the new task and the L1 term is the paper's code's
``default_l1_regularization``; the optimiser is CMA-ES (es.py) with a budget of 40
evaluations, starting at w = 0 (the code's ``init=[0] * N``; there ΔW = 0: the base model).

Parameters: none are trained; K numbers are searched. The composed adapter holds
r·(in + out) numbers per adapted Linear (Σ r_i·(in + out) when exact), like any LoRA.
Identity: w = 0 gives ΔW = 0; a one-hot w = e_k gives adapter k itself, in both modes.
Merge: the composed adapter is a plain LoRA adapter (peft_type "LORA"): W ← W + s B A.

Departures from the paper's code: CMA-ES written here, not nevergrad's ``NGOpt`` (which
picks an optimiser itself; the paper names CMA-ES), with nevergrad's default step for a
bounded array, σ0 = (upper − lower) / 6, and the best evaluated w returned; the loss is
the token-weighted mean loss over the few-shot set (the code adds up per-batch mean
losses and divides by the number of examples, which shrinks the loss next to the L1 term
as the set grows); the seed defaults to 0 (nevergrad's random draws cannot be
reproduced anyway); DoRA adapters, modules_to_save copies and trained biases are
refused (their tensors are not low-rank factors).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...autograd import no_grad
from ...backend import to_device, to_numpy
from ...errors import ConfigError
from . import es
from .combine import combined_factors
from .lora import LoraConfig, LoraLayer
from ..core.peft_model import PeftModel


@dataclass(frozen=True)
class LoraHubConfig:
    budget: int = 40  # evaluations of the objective (the code's max_inference_step)
    lower: float = -1.5  # the box of every w_i
    upper: float = 1.5
    l1: float = 0.05  # weight of the mean |w_i| penalty
    sigma0: float = 0.5  # CMA-ES's first step size, (upper − lower) / 6
    popsize: int | None = None  # CMA-ES's λ; None: 4 + ⌊3 ln K⌋
    exact: bool = False  # concatenate (Σ w_i s_i B_i A_i) instead of mixing A and B separately
    seed: int = 0

    def __post_init__(self):
        def require(name, ok, message):
            if not ok:
                raise ConfigError(f"LoraHubConfig field {name!r} {message}, got {getattr(self, name)!r}")

        require("budget", type(self.budget) is int and self.budget >= 1, "must be a positive integer")
        require("lower", self.lower < 0, "must be negative (the search starts at w = 0)")
        require("upper", self.upper > 0, "must be positive (the search starts at w = 0)")
        require("l1", self.l1 >= 0, "must be >= 0")
        require("sigma0", self.sigma0 > 0, "must be positive")
        require("popsize", self.popsize is None or type(self.popsize) is int and self.popsize >= 2,
                "must be None or an integer >= 2")
        require("exact", isinstance(self.exact, bool), "must be true or false")


@dataclass
class LoraHubResult:
    weights: np.ndarray  # the best w found
    loss: float  # the few-shot loss L(w) there
    objective: float  # L(w) + l1 · mean |w|
    history: list  # every evaluation: (w, loss, objective), in order


class LoraHub:
    """The source adapters of a PeftModel and the composed adapter ``name`` their weights write.

    The model is used for every evaluation: :meth:`set_weights` overwrites the composed
    adapter's factors in place (no reloading), and only that adapter is active.
    """

    def __init__(self, peft_model: PeftModel, sources: list[str], config: LoraHubConfig = LoraHubConfig(),
                 name: str = "lorahub"):
        self.peft_model, self.sources, self.config, self.name = peft_model, list(sources), config, name
        configs = _check_sources(peft_model, self.sources)
        self.layers = [m for m in peft_model.adapter_modules() if isinstance(m, LoraLayer)
                       and any(s in m.adapter_names() for s in self.sources)]
        for layer in self.layers:
            _check_layer(layer, self.sources, config.exact)
        if config.exact:  # rank Σ r_i, s = 1; its factors are written by set_weights
            peft_model.add_weighted_adapter(self.sources, [0.0] * len(self.sources), name, combination_type="cat")
        else:  # the first adapter's config (the paper's code): same r, α, hence the one s
            peft_model.add_adapter(name, configs[0].replace(init_lora_weights=True, inference_mode=True))
        peft_model.set_adapter(name, inference_mode=True)
        peft_model.eval()
        self.stacks = {}  # id(layer) -> (A_i stacked (K, r, in), B_i stacked (K, out, r)), float64 copies
        for layer in self.layers if not config.exact else ():
            pairs = [[to_numpy(t.data).astype(np.float64) for t in layer.factors(s)] for s in self.sources]
            self.stacks[id(layer)] = tuple(np.stack(f) for f in zip(*pairs))

    @classmethod
    def from_pretrained(cls, model, folders: list, config: LoraHubConfig = LoraHubConfig()) -> "LoraHub":
        """Load adapter folders (PEFT's layout) onto ``model`` as ``source_0`` ...; the composed
        adapter is ``default``, so ``save_pretrained(dir)`` writes it at ``dir`` itself."""
        if not folders:
            raise ConfigError("LoRAHub needs at least one adapter folder")
        names = [f"source_{i}" for i in range(len(folders))]
        peft_model = PeftModel.from_pretrained(model, folders[0], adapter_name=names[0])
        for folder, name in zip(folders[1:], names[1:]):
            peft_model.load_adapter(folder, name)
        return cls(peft_model, names, config, name="default")

    def factors(self, layer: LoraLayer, w):
        """The composed (A, B) of one layer for weights w: the equation of the docstring, once."""
        if self.config.exact:  # [w_i s_i A_i] stacked over rows, [B_i] over columns
            return combined_factors(layer, list(zip(self.sources, w)), "cat", layer.r[self.name])
        A_stack, B_stack = self.stacks[id(layer)]
        return np.tensordot(w, A_stack, axes=1), np.tensordot(w, B_stack, axes=1)  # Σ w_i A_i, Σ w_i B_i

    def delta_weight(self, layer: LoraLayer, w):
        """ΔW = s · B A of the composition in one layer, (out, in), float64 (s of the composed adapter)."""
        A, B = self.factors(layer, np.asarray(w, dtype=np.float64))
        return layer.scaling[self.name] * (B @ A)

    def set_weights(self, w) -> None:
        """Overwrite the composed adapter's factors with those of w, in place."""
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (len(self.sources),):
            raise ValueError(f"need {len(self.sources)} weights (one per adapter), got shape {w.shape}")
        for layer in self.layers:
            for target, value in zip(layer.factors(self.name), self.factors(layer, w)):
                target.data = to_device(value.astype(target.dtype), target.device)

    def objective(self, w, loss_fn) -> tuple[float, float]:
        """(L(w), L(w) + l1 · mean |w_i|), with L = ``loss_fn(peft_model)`` under no_grad."""
        self.set_weights(w)
        with no_grad():
            loss = float(loss_fn(self.peft_model))
        return loss, loss + self.config.l1 * float(np.mean(np.abs(w)))

    def search(self, loss_fn, callback=None) -> LoraHubResult:
        """Find w by CMA-ES from w = 0 within the budget; the model is left holding the best w.

        ``loss_fn(peft_model) -> float`` is the mean few-shot loss (e.g. minipeft.train.evaluate);
        ``callback(i, w, loss, objective)`` is called after every evaluation.
        """
        c, history = self.config, []

        def f(w):
            loss, value = self.objective(w, loss_fn)
            history.append((w.copy(), loss, value))
            if callback is not None:
                callback(len(history), w, loss, value)
            return value

        found = es.minimize(f, np.zeros(len(self.sources)), c.sigma0, c.budget, np.random.default_rng(c.seed),
                            c.lower, c.upper, c.popsize)
        best = min(range(len(history)), key=lambda i: history[i][2])  # the first of the best, as es keeps
        self.set_weights(found.x)
        return LoraHubResult(found.x, history[best][1], found.fx, history)

    def save_pretrained(self, folder) -> None:
        """Write the composed adapter (peft_type LORA) in PEFT's layout."""
        self.peft_model.save_pretrained(folder, selected_adapters=[self.name])


def _check_sources(peft_model, sources) -> list[LoraConfig]:
    missing = [s for s in sources if s not in peft_model.peft_config]
    if not sources or missing:
        raise ConfigError(f"LoRAHub source adapter(s) {missing or sources} not found; "
                          f"adapters: {sorted(peft_model.peft_config)}")
    configs = [peft_model.peft_config[s] for s in sources]
    for s, c in zip(sources, configs):
        # type(), not isinstance: DyLoRA / ReLoRA configs subclass LoraConfig, but their A, B
        # alone are not the adapter (a rank to truncate to; weights merged at restarts).
        if type(c) is not LoraConfig or c.use_dora or c.modules_to_save or c.bias != "none":
            raise ConfigError(f"LoRAHub composes plain LoRA adapters; {s!r} is not one (DyLoRA, ReLoRA, "
                              "DoRA, modules_to_save or trained biases have no plain low-rank factors to weight)")
    return configs


def _check_layer(layer: LoraLayer, sources, exact: bool) -> None:
    """Every layer holds all sources; mixing A and B separately needs equal shapes and one s."""
    absent = [s for s in sources if s not in layer.adapter_names()]
    if absent:
        raise ConfigError(f"LoRAHub needs adapters on the same layers; {absent} do not adapt a layer "
                          f"{[s for s in sources if s not in absent]} adapt")
    shapes = {tuple(layer.factors(s)[0].shape) for s in sources}
    scalings = {layer.scaling[s] for s in sources}
    if not exact and (len(shapes) > 1 or len(scalings) > 1):
        raise ConfigError(f"LoRAHub's A/B mix needs equal ranks and scalings in every layer, got A shapes "
                          f"{sorted(shapes)} and scalings {sorted(scalings)}; use exact=True (concatenation)")
