"""Data files shipped inside the minipeft package.

``stories260K/`` is a tiny, really trained LLaMA-architecture model (260,032
float32 parameters; Karpathy's tinyllamas, MIT) in the Hugging Face layout:
``config.json``, ``model.safetensors``, ``tokenizer.json`` and friends. It lets
the examples and tests run a real model without downloading anything.
``SOURCE.md`` there records its origin, the conversion and the file hashes.
"""
from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL = "stories260K"


def bundled_model_path() -> str:
    """Absolute path of the bundled ``stories260K`` HF model folder.

    The folder sits next to this file, so this works from a source checkout and
    from an installed (unzipped) wheel alike.
    """
    return str(Path(__file__).resolve().parent / BUNDLED_MODEL)
