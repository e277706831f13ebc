"""Options and helpers shared by the sub-commands."""
from __future__ import annotations

import argparse
import copy
import re
import sys

from ..data import bundled_model_path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default: argparse's own formatter adds ``(default: X)``
    only to options that have a help text; this one adds it to every option that takes a
    value (None included: the option is unset unless given), unless the help already says
    what the default is."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        return f"{text} (default: %(default)s)" if self._adds_default(action) else text

    def _format_action(self, action):
        if not action.help and self._adds_default(action):  # argparse shows nothing without a help text
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    @staticmethod
    def _adds_default(action) -> bool:
        return not (action.default is argparse.SUPPRESS or action.required
                    or not action.option_strings or action.nargs == 0
                    or re.search(r"\bdefault\b", action.help or ""))


class Parser(argparse.ArgumentParser):
    """The sub-commands' parser class: :class:`HelpFormatter` unless a command asks for another."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_model_option(parser) -> None:
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="Hugging Face model folder or .gguf file (default: the bundled stories260K)")
    parser.add_argument("--device", default="cpu", help="'cpu' (NumPy) or 'cuda' (CuPy)")
    parser.add_argument("--threads", type=thread_count, default=None, metavar="N",
                        help="BLAS threads for NumPy's matrix products (default: half the CPUs, 1 to 4, or what "
                             "OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS say when set)")


def integer_at_least(lowest: int):
    """An argparse ``type``: an integer >= ``lowest`` (anything else is a usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lowest - 1
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lowest}, got {text!r}")
        return value
    return parse


thread_count = integer_at_least(1)  # --threads


def model_folder(args) -> str:
    return args.model or bundled_model_path()


def say(message: str) -> None:
    """Information for the user: stderr, so stdout carries only results."""
    print(message, file=sys.stderr, flush=True)
