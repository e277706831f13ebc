"""``minipeft merge``: fold an adapter into the base weights and write a plain HF model folder.

The result loads in transformers (and in minipeft) with no PEFT at all; the
base folder's tokenizer files are copied along so the folder is complete.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..models import LlamaForCausalLM
from ..peft import PeftModel
from .common import add_model_option, model_folder, say

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into the base model; write an HF folder")
    add_model_option(p)
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (adapter_config.json ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    p.add_argument("--rank", type=int, default=None, metavar="b",
                   help="merge a DyLoRA adapter at rank b: W + (alpha / b) B[:, :b] A[:b]")
    p.set_defaults(run=run)


def load_with_adapter(folder: str, adapter: str, device: str = "cpu", rank: int | None = None):
    """The base model with the adapter in ``adapter`` loaded on top (inference mode); ``rank``
    runs a DyLoRA adapter at that rank."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder, device=device), adapter)
    if rank is not None:
        model.set_rank(rank)
    return model


def run(args) -> int:
    folder = model_folder(args)
    merged = load_with_adapter(folder, args.adapter, args.device, rank=args.rank).merge_and_unload()
    out = Path(args.out)
    merged.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).exists():
            shutil.copyfile(Path(folder) / name, out / name)
    say(f"merged {args.adapter} into {folder}")
    print(f"model: {out}")
    return 0
