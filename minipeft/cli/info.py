"""``minipeft info``: a model's architecture and its parameter counts per module kind; with
``--adapter DIR``, the adapter's method, its settings and its parameter count on that model."""
from __future__ import annotations

from collections import Counter

from ..models import LlamaForCausalLM
from .common import add_model_option, model_folder


# shown even at their defaults: what a reader of an adapter asks first (its rank, where it sits)
ALWAYS_SHOWN = ("r", "target_modules")


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="architecture and parameter counts of a model")
    add_model_option(p)
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="also describe this adapter folder (method, settings, trainable parameters)")
    p.set_defaults(run=run)


def parameter_counts(model) -> Counter:
    """Parameters per module kind: the last module name of each parameter (q_proj, norm, ...)."""
    counts = Counter()
    for name, p in model.named_parameters():
        parts = name.split(".")
        kind = parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]
        counts[kind if parts[-1] == "weight" else f"{kind}.{parts[-1]}"] += int(p.size)
    return counts


def run(args) -> int:
    folder = model_folder(args)
    model = LlamaForCausalLM.from_pretrained(folder)
    c = model.config
    print(f"model: {folder}")
    print(f"type: {c.model_type}  layers: {c.num_hidden_layers}  hidden: {c.hidden_size}  "
          f"intermediate: {c.intermediate_size}  vocab: {c.vocab_size}")
    print(f"heads: {c.num_attention_heads} query / {c.num_key_value_heads} key-value, head_dim {c.head_dim}  "
          f"rope: {c.rope_type} (theta {c.rope_theta:g})  tied embeddings: {c.tie_word_embeddings}")
    counts = parameter_counts(model)
    total = sum(counts.values())
    width = max(len(k) for k in counts)
    print("parameters by module kind:")
    for kind, n in counts.items():
        print(f"  {kind:<{width}}  {n:>12,}  {100 * n / total:6.2f}%")
    print(f"  {'total':<{width}}  {total:>12,}")
    if args.adapter:
        describe_adapter(model, args.adapter)
    return 0


def describe_adapter(model, folder) -> None:
    """The adapter's peft_type, its rank and target modules, its other non-default settings and
    what it trains on ``model``."""
    from dataclasses import fields  # noqa: PLC0415

    from ..peft import PeftModel  # noqa: PLC0415 - PEFT only when asked for
    from ..peft.core import registry  # noqa: PLC0415

    peft_model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    config = peft_model.peft_config["default"]
    method = registry.get_method(config.peft_type)
    defaults = type(config)() if not _required_fields(config) else None
    settings = {f.name: getattr(config, f.name) for f in fields(config)
                if f.name not in ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping")
                and (defaults is None or f.name in ALWAYS_SHOWN
                     or getattr(config, f.name) != getattr(defaults, f.name))}
    trainable, total = peft_model.get_nb_trainable_parameters()
    print(f"adapter: {folder}")
    print(f"method: {config.peft_type} (mergeable: {'yes' if method.mergeable else 'no'})")
    for key, value in settings.items():
        print(f"  {key}: {list(value) if isinstance(value, tuple) else value!r}")
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def _required_fields(config) -> bool:
    """Does the config class need arguments (AdaLoRA's total_step)? Then every field is shown."""
    try:
        type(config)()
    except (TypeError, ValueError):
        return True
    return False
