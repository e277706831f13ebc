"""``minipeft info``: a model's architecture and its parameter counts per module kind."""
from __future__ import annotations

from collections import Counter

from ..models import LlamaForCausalLM
from .common import add_model_option, model_folder


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="architecture and parameter counts of a model")
    add_model_option(p)
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
    return 0
