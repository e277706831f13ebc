"""The ``minipeft`` command line (also ``python -m minipeft``).

Each sub-command lives in its own module and registers itself with
``add_parser(subparsers)``; ``main`` dispatches. Results go to stdout,
information to stderr, and a :class:`~minipeft.errors.MiniPeftError` is printed
as one line (``minipeft: error: ...``) with exit status 1 instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import MiniPeftError
from . import compare, generate, info, lorahub, merge, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minipeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, compare, generate, merge, info, lorahub):
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except MiniPeftError as exc:
        print(f"minipeft: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"minipeft: error: {exc.filename}: no such file or directory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("minipeft: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
