"""Files in and out: safetensors, Hugging Face model folders and tokenizers.

* :mod:`.safetensors` - our own reader/writer of the safetensors format, with
  errors that name the file and tensor at fault, and atomic writes.
* :mod:`.checkpoint` - HF model folders: one ``model.safetensors`` or shards
  with ``model.safetensors.index.json``; JSON files with clear errors.
* :mod:`.tokenizer` - :class:`Tokenizer`, text <-> ids over HF ``tokenizers``.
"""
from .checkpoint import load_model_tensors, read_json, save_model_tensors, write_json
from .safetensors import (
    TensorInfo,
    atomic_write,
    read_safetensors,
    read_safetensors_header,
    write_safetensors,
)
from .tokenizer import Tokenizer

__all__ = [
    "TensorInfo",
    "Tokenizer",
    "atomic_write",
    "load_model_tensors",
    "read_json",
    "read_safetensors",
    "read_safetensors_header",
    "save_model_tensors",
    "write_json",
    "write_safetensors",
]
