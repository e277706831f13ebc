"""DyLoRA: one LoRA adapter trained to work at every rank b ≤ r_max (Valipour et al., 2023,
arXiv:2210.07558; the authors' code is huawei-noah/Efficient-NLP DyLoRA/, REFERENCE 2.5).

A targeted Linear, W (out, in) frozen, holds LoRA's factors A (r, in), B (out, r) with
r = r_max. At rank b the layer is the plain LoRA made of the first b of them (§3):

    y = x Wᵀ + b + (α / b) · (dropout(x) A_{:b}ᵀ) B_{:b}ᵀ     A_{:b} = A[:b]  (b, in)
                                                              B_{:b} = B[:, :b]  (out, b)
    ΔW_b = (α / b) · B_{:b} A_{:b}

Scaling: the paper's α/b with b the rank (1-based). The authors' code counts b from 0 and
multiplies both truncated factors by √(r/(b+1)) on top of s = α/r, i.e. ΔW = (α/(b+1))
B[:, :b+1] A[:b+1]: the same number with b+1 for our b — the off-by-one is in the counting,
not the arithmetic. (Their default current_rank 0 thus means rank 1; ours means r_max.)

Training: each step runs at a rank b drawn uniformly from {r_min, …, r_max} from
``PeftModel.rng`` (the generator of the dropout masks), one b for every layer of the
adapter, as the authors' ``on_step_begin`` callback. The trainer has no pre-step hook, so
the b of step t+1 is drawn in ``on_step_end(t)``, after update t; the b of step 0 is drawn
by ``apply`` right after the factors are initialised. ``frozen=True`` (the authors' GLUE
mode) trains only row b of A and column b of B: ``mask_gradients`` zeroes the gradient of
the other rows/columns (the authors detach them: the same gradient). Rows and columns past b
are not in the forward, so their gradient is zero in either mode. (With AdamW a zero gradient
does not stop a row: its momentum and weight decay still move it, in the authors' code too.)

Eval and export: in eval mode, in merges (``merge_adapter``, ``merge_and_unload``,
``minipeft merge --rank b``) and in ``minipeft generate --rank b`` the adapter runs at
its eval rank: config ``eval_rank`` (None: r_max), changed by ``model.set_rank(b)`` (which
also updates the config, so save → load keeps it). ``loss_per_rank`` (below)
tabulates the eval loss at each rank.

Parameters: r_max·(in + out) per Linear, r_max·(num + dim) per Embedding (LoRA's count at
r = r_max); rank b uses b·(in + out) of them. Identity at init: B = 0 (A kaiming-uniform, as
LoRA), so ΔW_b = 0 for every b. Merge: W ← W + (α/b) B_{:b} A_{:b}, b the eval rank; unmerge
subtracts it; ``set_rank`` refuses while the adapter is merged. At b = r_max this is LoRA
exactly (s = α/r), and the file is LoRA's layout (keys lora_A / lora_B with all r_max
ranks) with peft_type "DYLORA", plus ``dylora_state.json``: the rank of the next training
step, so that a resumed run continues exactly.

Departures: ``frozen`` defaults to False (an opt-in flag; the authors' GLUE script trains
frozen); use_dora, use_rslora, PiSSA and rank_pattern are refused (one rank range, LoRA's
α/b scaling); embeddings are truncated the same way (A_emb[:b], B_emb[:, :b]), which the
authors' code does not do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...errors import CheckpointError, ConfigError
from ...io import read_json, write_json
from . import lora
from ..core import targeting
from ..core.base import layers_holding
from ..core.config import _is_int
from ..core.method import CliOption, CliSpec, PeftMethod
from .lora import ALPHA, DROPOUT, TARGET, R, LoraConfig, LoraEmbedding, LoraLinear

STATE_NAME = "dylora_state.json"


@dataclass(frozen=True)
class DyLoraConfig(LoraConfig):
    """LoRA's fields (r is r_max; PEFT's defaults r = 8, α = 8) plus the rank range."""

    peft_type: ClassVar[str] = "DYLORA"

    r_min: int = 1  # training ranks are drawn uniformly from {r_min, ..., r}
    frozen: bool = False  # train only row / column b of A / B at each step
    eval_rank: int | None = None  # the rank of eval mode, merges and export; None: r

    def __post_init__(self):
        super().__post_init__()
        self._require("r_min", _is_int(self.r_min) and 1 <= self.r_min <= self.r,
                      f"must be an integer in [1, r={self.r}]")
        self._require("frozen", isinstance(self.frozen, bool), "must be true or false")
        self._require("eval_rank", self.eval_rank is None or _is_int(self.eval_rank) and 1 <= self.eval_rank <= self.r,
                      f"must be None or an integer in [1, r={self.r}]")
        for name in ("use_dora", "use_rslora"):
            self._require(name, not getattr(self, name), "must be false for DyLoRA (its scaling is α / b)")
        self._require("init_lora_weights", self.init_lora_weights != "pissa", "cannot be 'pissa' for DyLoRA")
        self._require("rank_pattern", not self.rank_pattern, "must be empty for DyLoRA (one rank range for all layers)")


class DyLoraLayer:
    """Mixed into LoRA's layers: the forward and ΔW use the first b ranks, scaled by α / b."""

    def __init__(self, base_layer, rng):
        super().__init__(base_layer, rng)
        self.train_rank: dict[str, int] = {}  # adapter name -> b of the current training step
        self.eval_rank: dict[str, int] = {}  # adapter name -> b of eval mode, merges and export

    def update_layer(self, name, r, alpha, config: DyLoraConfig, rng) -> None:
        super().update_layer(name, r, alpha, config, rng)
        self.train_rank[name] = r  # until apply() draws the first training rank
        self.eval_rank[name] = config.eval_rank or r

    def truncated(self, name: str, b: int):
        """(A_{:b}, B_{:b}, α / b): the rank-b LoRA inside the rank-r_max one."""
        A, B = self.factors(name)
        s = self.lora_alpha[name] / b
        return (A, B, s) if b == self.r[name] else (A[:b], B[:, :b], s)

    def active_factors(self, name: str):
        """What the forward uses: the step's rank in training, the eval rank in eval mode."""
        return self.truncated(name, (self.train_rank if self.training else self.eval_rank)[name])

    def delta_ba(self, name: str):
        """ΔW_b = (α / b) B_{:b} A_{:b} at the eval rank: merges never depend on train()/eval()."""
        A, B, s = self.truncated(name, self.eval_rank[name])
        return s * (B.data @ A.data)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.train_rank.pop(name, None)
        self.eval_rank.pop(name, None)


class DyLoraLinear(DyLoraLayer, LoraLinear):
    pass


class DyLoraEmbedding(DyLoraLayer, LoraEmbedding):
    pass


def adapter_layers(model, name: str) -> list[DyLoraLayer]:
    """The DyLoRA layers of ``model`` (a PeftModel or the bare model) holding adapter ``name``."""
    bare = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [layer for _, layer in layers_holding(bare, name, DyLoraLayer)]


def draw_rank(rng, config: DyLoraConfig) -> int:
    """b ~ U{r_min, ..., r_max}."""
    return int(rng.integers(config.r_min, config.r + 1))


def apply(model, config: DyLoraConfig, rng, adapter_name: str = "default"):
    """LoRA's apply with DyLoRA's layers, then the rank of the first training step."""
    group = lora.apply(model, config, rng, adapter_name, classes=(DyLoraLinear, DyLoraEmbedding),
                       group_prefix="dylora")
    b = draw_rank(rng, config)
    for layer in adapter_layers(model, adapter_name):
        layer.train_rank[adapter_name] = b
    return group


# ----- hooks the trainer calls through PeftModel ------------------------------------------
def mask_gradients(peft_model, name: str, step: int) -> None:
    """Frozen mode: keep only the gradient of row b of A and column b of B (b the step's rank)."""
    if not peft_model.peft_config[name].frozen:
        return
    for layer in adapter_layers(peft_model, name):
        i = layer.train_rank[name] - 1  # 0-based index of rank b
        A, B = layer.factors(name)
        for grad, axis in ((A.grad, 0), (B.grad, 1)):
            if grad is not None:
                index = [slice(None)] * grad.ndim
                for part in (slice(None, i), slice(i + 1, None)):
                    index[axis] = part
                    grad[tuple(index)] = 0


def on_step_end(peft_model, name: str, step: int) -> None:
    """Draw the rank b of the next step (step + 1) for every layer of the adapter."""
    b = draw_rank(peft_model.rng, peft_model.peft_config[name])
    for layer in adapter_layers(peft_model, name):
        layer.train_rank[name] = b


def set_rank(peft_model, rank: int, adapter_name: str | None = None) -> None:
    """Run adapter ``adapter_name`` (default: the active DyLoRA adapters) at rank ``rank`` in
    eval mode, merges and saves; the config's eval_rank changes with it."""
    names = [adapter_name] if adapter_name else peft_model.active_adapters
    names = [n for n in names if isinstance(peft_model.peft_config.get(n), DyLoraConfig)]
    if not names:
        kinds = sorted({c.peft_type for c in peft_model.peft_config.values()})
        raise ConfigError(f"set_rank / --rank needs a DyLoRA adapter; the model has {kinds} adapters")
    for name in names:
        config = peft_model.peft_config[name]
        if not (_is_int(rank) and 1 <= rank <= config.r):
            raise ConfigError(f"rank must be an integer in [1, {config.r}] (adapter {name!r} has r_max {config.r}), "
                              f"got {rank!r}")
        layers = adapter_layers(peft_model, name)
        if any(name in layer.merged_adapters for layer in layers):
            raise ValueError(f"adapter {name!r} is merged; call unmerge_adapter() before changing its rank")
        peft_model.peft_config[name] = config.replace(eval_rank=rank)
        for layer in layers:
            layer.eval_rank[name] = rank


# ----- state beyond the parameters: the rank of the next training step -----------------------
def save_extra(peft_model, name: str, folder) -> None:
    layers = adapter_layers(peft_model, name)
    write_json(folder / STATE_NAME, {"train_rank": layers[0].train_rank[name]})


def load_extra(peft_model, name: str, folder) -> None:
    path = folder / STATE_NAME
    if not path.exists():  # written by another tool: the training rank stays as drawn
        return
    b, config = read_json(path, "DyLoRA state", CheckpointError).get("train_rank"), peft_model.peft_config[name]
    if not (_is_int(b) and 1 <= b <= config.r):
        raise CheckpointError(f"'{path}': train_rank must be an integer in [1, {config.r}], got {b!r}")
    for layer in adapter_layers(peft_model, name):
        layer.train_rank[name] = b


# ----- one trained adapter, many adapters: the eval loss at each rank -------------------------
def loss_per_rank(peft_model, loss_fn, ranks, adapter_name: str | None = None) -> dict[int, float]:
    """{b: ``loss_fn(peft_model)`` with the DyLoRA adapter(s) at rank b} (e.g. the mean eval
    loss: ``lambda m: minipeft.train.evaluate(m, data)["eval_loss"]``). The eval rank is
    restored afterwards."""
    names = [adapter_name] if adapter_name else peft_model.active_adapters
    before = {n: peft_model.peft_config[n] for n in names if isinstance(peft_model.peft_config.get(n), DyLoraConfig)}
    out = {}
    try:
        for b in ranks:
            set_rank(peft_model, int(b), adapter_name)
            out[int(b)] = float(loss_fn(peft_model))
    finally:
        for name, config in before.items():
            set_rank(peft_model, config.eval_rank or config.r, name)
            peft_model.peft_config[name] = config  # eval_rank None stays None
    return out


def format_rank_table(losses: dict[int, float]) -> str:
    """A two-column text table: rank, eval loss (and perplexity)."""
    lines = ["rank  eval loss  perplexity"]
    lines += [f"{b:>4}  {loss:9.4f}  {math.exp(loss):10.3f}" for b, loss in sorted(losses.items())]
    return "\n".join(lines)


# ----- the method's row in the table, and its command line ---------------------------------
def cli_config(args) -> DyLoraConfig:
    return DyLoraConfig(r=args.r, r_min=args.r_min, frozen=args.dylora_frozen, lora_alpha=args.alpha,
                        lora_dropout=args.dropout, target_modules=targeting.parse_targets(args.target))


def cli_report(peft_model, args, eval_loss) -> None:
    """The eval loss at every rank 1..r_max (when there is eval data)."""
    if eval_loss is not None:
        print(format_rank_table(loss_per_rank(peft_model, eval_loss, range(1, args.r + 1))))


CLI_OPTIONS = (
    CliOption(("--r-min",), dict(type=int, default=1, help="smallest rank drawn in training (default 1)")),
    CliOption(("--dylora-frozen",), dict(action="store_true", help="train only row / column b of A / B")),
)

METHOD = PeftMethod(
    "DYLORA", DyLoraConfig, apply, DyLoraLayer, "dylora", default_target_modules=("q_proj", "v_proj"),
    mask_gradients=mask_gradients, on_step_end=on_step_end, save_extra=save_extra, load_extra=load_extra,
    cli=CliSpec({"dylora": cli_config}, (R, ALPHA, DROPOUT, TARGET) + CLI_OPTIONS,
                "DyLoRA (also uses --r as r_max, --alpha, --dropout, --target)", cli_report))
