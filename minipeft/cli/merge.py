"""``minipeft merge``: fold an adapter into the base weights and write a plain HF model folder,
or a GGUF file.

The folder loads in transformers (and in minipeft) with no PEFT at all; the
base folder's tokenizer files are copied along so the folder is complete.
An ``--out`` ending in ``.gguf`` writes one llama.cpp file instead (``--gguf-type``
f32, f16 or q8_0 ...), with the tokenizer as ``tokenizer.ggml.*`` metadata taken from
the base folder's ``tokenizer.json`` (or copied from a ``.gguf`` base).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import CheckpointError
from ..io.checkpoint import check_output_folder
from ..models import LlamaForCausalLM
from ..peft import PeftModel
from .common import add_model_option, model_folder, say

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into the base model; write an HF folder")
    add_model_option(p)
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (adapter_config.json ...)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output model folder, or a file ending in .gguf to write GGUF for llama.cpp")
    p.add_argument("--gguf-type", default="f16", choices=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"),
                   help="weight type of a .gguf --out (default: %(default)s; vectors stay f32)")
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
    writes_gguf = Path(args.out).suffix.lower() == ".gguf"
    # before anything is read or written: --out must not be an input, and must be writable
    if writes_gguf:
        check_gguf_output(args.out, folder)
    else:
        check_output_folder(args.out, "--out", {"--model": folder, "--adapter": args.adapter})
    merged = load_with_adapter(folder, args.adapter, args.device, rank=args.rank).merge_and_unload()
    out = Path(args.out)
    if writes_gguf:
        return write_merged_gguf(merged, folder, out, args)
    merged.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).exists():
            shutil.copyfile(Path(folder) / name, out / name)
    say(f"merged {args.adapter} into {folder}")
    print(f"model: {out}")
    return 0


def check_gguf_output(out, model: str) -> None:
    """A .gguf --out must not be the base model file nor a folder, and its folder must be writable."""
    out = Path(out)
    if os.path.realpath(out) == os.path.realpath(model):
        raise CheckpointError(f"--out '{out}' is the --model file; writing there would overwrite what it "
                              "reads: give --out another file name")
    if out.is_dir():
        raise CheckpointError(f"--out '{out}' is a folder; a .gguf --out names the file to write")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out '{out}' cannot be written: no permission to write to '{parent}'")
    if not parent.exists():
        check_output_folder(parent, "--out")  # creatable on the way down, or says why not


def write_merged_gguf(merged, base: str, out: Path, args) -> int:
    """Write the merged model as GGUF with the base's tokenizer; say what was written."""
    from ..io.gguf_writer import write_gguf
    from ..io.gguf_tokenizer import tokenizer_fields_from_folder, tokenizer_fields_from_gguf
    from ..models.pretrained import is_gguf

    config = merged.config.to_dict()
    if is_gguf(base):
        fields = tokenizer_fields_from_gguf(base)
    elif (Path(base) / "tokenizer.json").is_file():
        fields = tokenizer_fields_from_folder(base, config["vocab_size"])
    else:
        fields = {}
        say(f"warning: '{base}' has no tokenizer.json; {out} gets no tokenizer, which llama.cpp needs")
    types = write_gguf(out, config, merged.state_dict(), args.gguf_type, fields,
                       name=f"{Path(base).name} + {Path(args.adapter).name}")
    counts = {kind: list(types.values()).count(kind) for kind in sorted(set(types.values()))}
    say(f"merged adapter {args.adapter} into base model {base}; wrote GGUF file {out} "
        f"({out.stat().st_size:,} bytes; tensors: "
        + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ")")
    print(f"model: {out}")
    return 0
