"""The ``minipeft`` command line (also ``python -m minipeft``).

Each sub-command lives in its own module and registers itself with
``add_parser(subparsers)``; ``main`` dispatches. Results go to stdout,
information to stderr, and a :class:`~minipeft.errors.MiniPeftError` is printed
as one line (``minipeft: error: ...``) with exit status 1 instead of a traceback;
so are warnings (``minipeft: warning: ...``) and an operating-system error
(a full disk, a folder that cannot be written). A command may set ``words`` (a
function on message text) to say its messages in its own flags (``--steps``
rather than ``max_steps``). ``--threads`` (every command that loads a model)
sets the BLAS thread count while the command runs (minipeft/threads.py).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

from .. import __version__
from ..errors import MiniPeftError
from ..threads import num_threads
from . import chat, compare, generate, info, lorahub, merge, profile, train
from .common import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minipeft", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"minipeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (train, compare, generate, chat, merge, info, lorahub, profile):
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    words = getattr(args, "words", None) or (lambda text: text)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"minipeft: warning: {words(_one_line(message))}", file=sys.stderr, flush=True)

    # --threads: the BLAS thread count while the command runs (minipeft/threads.py chooses without it)
    threads = num_threads(args.threads) if "threads" in args else contextlib.nullcontext()
    with warnings.catch_warnings(), threads:
        warnings.showwarning = show_warning
        try:
            return args.run(args) or 0
        except MiniPeftError as exc:
            print(f"minipeft: error: {words(_one_line(exc))}", file=sys.stderr)
            return 1
        except FileNotFoundError as exc:
            print(f"minipeft: error: {exc.filename}: no such file or directory", file=sys.stderr)
            return 1
        except OSError as exc:  # a full disk, a folder made read-only mid-run: what and where, in one line
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"minipeft: error: {where}{_one_line(exc.strerror or exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:
            said = _one_line(exc)  # the trainer's says where the run was saved
            print(f"minipeft: {words(said) if said else 'interrupted'}", file=sys.stderr)
            return 130


def _one_line(exc) -> str:
    return " ".join(str(exc).split())
