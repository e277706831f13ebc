"""`PeftMethod`: one row of the method table, and every attachment point a method may use.

A method is its config class and ``apply(model, config, rng, adapter_name)``, which adapts
the model in place and returns the new parameters as a :class:`~minipeft.nn.ParameterGroup`
named ``<group_prefix>:<adapter name>``. Each method file ends with its own ``METHOD`` row;
core/registry.py lists the rows. Everything else is optional and typed here, with one
owner each: the method supplies the math, the core (PeftModel, saving, the trainer) does
the plumbing.

Where a method attaches:

* **a wrapped layer** -- ``apply`` replaces targeted modules by an
  :class:`~minipeft.peft.core.base.AdapterLayer` (LoRA family, IA3). Output side:
  ``AdapterLayer.adapter_forward``; input side: ``AdapterLayer.adapter_input`` (IA3 on a
  feed-forward module scales the layer's input).
* **the input embeddings** -- ``prompt_embeddings(peft_model, name, batch_size)`` returns
  (B, P, hidden) virtual-token embeddings; PeftModel puts them in front of the token
  embeddings and prefixes the attention mask with ones, the labels with -100 and shifts
  the positions (real tokens at P..P+T-1), also in generation with the KV cache.
* **attention keys / values** -- ``prefix_key_values(peft_model, name, batch_size)`` returns,
  per layer, (K, V) of shape (B, Hkv, P, Dh), in the cache's post-RoPE space (used as
  given, never rotated, as PEFT injects past_key_values); PeftModel writes them into the KV
  cache in front of the sequence's own, differentiably.
* **between sublayers** -- ``apply`` sets a decoder layer's ``attention_adapters`` /
  ``output_adapters`` (models/llama.py): the residual join after attention / after the MLP
  (bottleneck adapters, AdapterFusion).
* **the gradient before the optimizer** -- ``mask_gradients(peft_model, name, step)``
  after backward (DyLoRA's frozen ranks; the selective methods' masks).
* **a calibration pass** -- ``calibrate(peft_model, name, batches)`` before the first
  training step of a fresh run: ``batches`` iterates training batches (for Fisher
  scores); the trainer runs it with a progress bar and never on resume.
* **training-loop hooks** -- ``regularizer`` (a Tensor added to the training loss:
  AdaLoRA, AdapterFusion), ``on_step_end`` (after the optimizer step: AdaLoRA, DyLoRA,
  ReLoRA), ``edit_optimizer_state`` (after on_step_end, with the optimizer: ReLoRA).
* **decode time** -- outside the model and this table: proxy-tuning
  (additive/proxy_tuning.py) combines several models' next-token logits.

Files: PEFT's layout by default (core/saving.py). ``saved_tensors`` edits the arrays written
(AdaLoRA crops to its kept ranks); ``save_extra`` / ``load_extra`` keep files beside PEFT's
two (ReLoRA's merges). A method whose reference is another library's layout (bottleneck
adapters: the ``adapters`` library) gives ``write_folder`` / ``read_folder_config`` /
``read_folder_weights`` instead.

``after_unload(model)``: the last step of merge_and_unload, once the adapter layers are gone (BitFit
makes the biases merging created parameters and declares them in the model's config).

``mergeable``: False for methods whose function is not a weight update (prompt, prefix,
bottleneck, fusion); merging them is refused before anything changes.
``cli``: the method's ``minipeft train`` names, options, config builder and report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .config import PeftConfig


@dataclass(frozen=True)
class CliOption:
    """One ``minipeft train`` option: argparse's flags and keyword arguments. Methods that
    share an option (``--r``) share the same CliOption object; the CLI adds it once."""

    flags: tuple[str, ...]
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class CliSpec:
    """How ``minipeft train`` offers a method.

    ``configs``: ``--method`` name -> ``(args) -> PeftConfig`` (one method row may offer
    several names: LoRA offers ``lora`` and ``dora``; besides the flags, ``args.resume_checkpoint``
    is the checkpoint folder a ``--resume`` continues, else None); ``options``: the flags they read;
    ``group``: the help heading; ``report``: ``(peft_model, args, datasets) -> None``, what the
    method prints or draws after training (AdaLoRA's rank table).
    """

    configs: dict
    options: tuple[CliOption, ...] = ()
    group: str = ""
    report: Callable | None = None


@dataclass(frozen=True)
class PeftMethod:
    peft_type: str  # PEFT's name, written as "peft_type" in adapter_config.json
    config_cls: type[PeftConfig]
    apply: Callable  # (model, config, rng, adapter_name) -> ParameterGroup
    layer_cls: type | tuple  # the adapter holder class(es) apply() creates
    group_prefix: str  # parameter groups are named "<group_prefix>:<adapter name>"
    default_target_modules: tuple[str, ...] = ()  # PEFT's default for LLaMA when target_modules is None
    mergeable: bool = True  # False: merge / merge_and_unload / `minipeft merge` refuse it
    # attachment points beyond a wrapped layer (see the module docstring)
    prompt_embeddings: Callable | None = None  # (peft_model, name, batch_size) -> Tensor (B, P, hidden)
    prefix_key_values: Callable | None = None  # (peft_model, name, batch_size) -> [(K, V)] per layer
    # training-loop hooks, each (peft_model, adapter_name, ...) as named in the docstring
    regularizer: Callable | None = None  # (peft_model, name) -> Tensor | None, added to the loss
    mask_gradients: Callable | None = None  # (peft_model, name, step), after backward
    calibrate: Callable | None = None  # (peft_model, name, batches), before a fresh run's first step
    on_step_end: Callable | None = None  # (peft_model, name, step), after the optimizer step
    edit_optimizer_state: Callable | None = None  # (peft_model, name, step, optimizer), after on_step_end
    after_unload: Callable | None = None  # (model), in merge_and_unload once the layers are gone (BitFit)
    # files
    saved_tensors: Callable | None = None  # (peft_model, name, {file key: array}) -> what to write
    save_extra: Callable | None = None  # (peft_model, name, folder): files beyond the adapter's tensors
    load_extra: Callable | None = None  # (peft_model, name, folder): reads them back (load, resume)
    write_folder: Callable | None = None  # (peft_model, name, folder): another library's layout instead
    read_folder_config: Callable | None = None  # (folder) -> PeftConfig | None: recognises that layout
    read_folder_weights: Callable | None = None  # (peft_model, name, folder): loads it, checked first
    cli: CliSpec | None = None
