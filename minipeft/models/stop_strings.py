"""Stop strings: a row ends when its text comes to contain one of them, as transformers'
``generate(stop_strings=..., tokenizer=...)`` ends it (its ``StopStringCriteria``).

A stop string matches when it appears in the decoded sequence (prompt included) overlapping the
token just chosen: the token that completes it ends the row and stays in the output, and a stop
string that already sat wholly in the earlier tokens (in the prompt, say) never ends anything. So
after each step the last tokens of a row are decoded twice, without and with the new one, and the
row ends if a stop string occurs in the second text anywhere past what the two texts share.

Only a window of the last tokens is decoded: a stop string of L characters is at most 4L UTF-8
bytes, hence at most 4L tokens, so ``4·L + 2`` tokens always hold a match that overlaps the last
one. Both texts start at the same token, so they agree up to the new token's text (a byte the new
token completes turns a replacement character into the real one: the shared prefix stops there,
and a match counts from it on). Special tokens are part of the text (``"<|im_end|>"`` can be a
stop string), as in transformers, which matches on the vocabulary's token strings.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputError


def checked_stop_strings(strings) -> list[str]:
    """``strings`` (one string or several) as a list; InputError unless each is a non-empty string."""
    try:
        strings = [strings] if isinstance(strings, str) else list(strings)
    except TypeError:
        strings = [strings]  # one value that is not a string: refused below
    if not strings or not all(isinstance(s, str) and s for s in strings):
        raise InputError(f"stop_strings must be non-empty strings, got {strings!r}")
    return strings


class StopStrings:
    def __init__(self, strings, tokenizer):
        strings = checked_stop_strings(strings)
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise InputError("stop_strings needs the tokenizer (generate(..., stop_strings=..., tokenizer=tok)), "
                             "as in transformers: the strings are matched on decoded text")
        self.strings, self.tokenizer = strings, tokenizer
        self.window = 4 * max(len(s) for s in strings) + 2

    def ended(self, ids: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` (a bool mask over the rows of ``ids``, (B, T); ``mask`` marks real
        tokens, not left padding) the last token ended."""
        out = np.zeros(ids.shape[0], dtype=bool)
        for row in np.flatnonzero(rows):
            tail = ids[row][mask[row].astype(bool)][-(self.window + 1):]
            before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False)
            after = self.tokenizer.decode(tail, skip_special_tokens=False)
            shared = len(os.path.commonprefix([before, after]))
            out[row] = any(after.find(s, max(0, shared - len(s) + 1)) != -1 for s in self.strings)
        return out
