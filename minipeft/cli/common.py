"""Options and helpers shared by the sub-commands."""
from __future__ import annotations

import sys

from ..data import bundled_model_path


def add_model_option(parser) -> None:
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="Hugging Face model folder (default: the bundled stories260K)")
    parser.add_argument("--device", default="cpu", help="'cpu' (NumPy) or 'cuda' (CuPy)")


def model_folder(args) -> str:
    return args.model or bundled_model_path()


def say(message: str) -> None:
    """Information for the user: stderr, so stdout carries only results."""
    print(message, file=sys.stderr, flush=True)
