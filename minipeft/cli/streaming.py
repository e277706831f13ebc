"""Printing generated text as it is generated, and generation warnings as one line each.

Tokens are not characters: a byte-level or byte-fallback tokenizer can split one
character (an emoji, a CJK character, an accented letter) over several tokens, and a
prefix of its bytes decodes to U+FFFD. So :class:`TextStream` decodes the prompt
plus all new ids each time, prints only what was added, and holds the text back
while it ends in U+FFFD, until the character's other bytes arrive (or the end);
transformers' ``TextStreamer`` holds back the same way. Decoding with the prompt in
front keeps the first new token's leading space, which a tokenizer's decoder drops
at the start of a text.
"""
from __future__ import annotations

import contextlib
import sys
import warnings

from ..io.tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what a partial UTF-8 sequence decodes to


def continuation_text(tokenizer: Tokenizer, ids: list[int], new_ids: list[int]) -> str:
    """The decoded continuation alone, so that decoded prompt + continuation reads as decoded text."""
    prompt_text = tokenizer.decode(ids)
    full = tokenizer.decode(list(ids) + list(new_ids))
    return full[len(prompt_text):] if full.startswith(prompt_text) else tokenizer.decode(new_ids)


class TextStream:
    """A ``generate`` streamer for one row: writes the continuation of ``prompt_ids`` to ``out``
    as the tokens come; :meth:`finish` writes what was held back and returns the whole text."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], out=None):
        self.tokenizer, self.prompt_ids, self.out = tokenizer, list(prompt_ids), out or sys.stdout
        self.new_ids: list[int] = []
        self.printed = ""

    def __call__(self, step_ids) -> None:
        self.new_ids.append(int(step_ids[0]))
        self._write(final=False)

    def finish(self) -> str:
        return self._write(final=True)

    def _write(self, final: bool) -> str:
        text = continuation_text(self.tokenizer, self.prompt_ids, self.new_ids)
        if (final or not text.endswith(INCOMPLETE)) and text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text
        return text


@contextlib.contextmanager
def one_line_warnings(translate=str):
    """Inside: a warning prints as ``minipeft: warning: ...`` on one stderr line, not as a
    file:line report with a source line (the user of the CLI did not write that source);
    ``translate`` rewrites the message (to name flags instead of argument names)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"minipeft: warning: {' '.join(translate(str(message)).split())}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        yield
