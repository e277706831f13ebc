"""File names and key prefixes of adapter folders, in one low module every method may import.

Hugging Face PEFT's layout (REFERENCE 1.3): a folder holds ``adapter_config.json`` and
``adapter_model.safetensors``; tensor keys start with ``base_model.model.`` (PEFT's
``PeftModel -> LoraModel -> model`` nesting) and carry no adapter name. Adapters other
than ``default`` live in a sub-folder named after them.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # every tensor key of an adapter file starts with it
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "pytorch_adapter.bin")  # refused, never unpickled


def adapter_folder(folder, name: str) -> Path:
    """PEFT's place for an adapter: the folder itself for ``default``, else ``folder/<name>``."""
    return Path(folder) if name == "default" else Path(folder) / name
