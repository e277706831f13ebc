"""matplotlib is optional: the one place that says when it is missing.

minipeft draws a few figures (a run's ``loss.png``, AdaLoRA's rank heat map, ``compare``'s
charts) with matplotlib's object API and the Agg canvas (no pyplot, no global backend
switch). matplotlib is an install extra, ``pip install -e ".[plots]"`` (or ``pip install
matplotlib``); without it the figures are skipped and :func:`matplotlib_missing` says so
once per process (one ``UserWarning``, always the same text from the same line, which
Python's default warning filter shows once), instead of skipping them silently.
"""
from __future__ import annotations

import warnings

MISSING = ('matplotlib is not installed, so no plots (loss.png, rank maps, compare charts) are drawn; '
           'install it with pip install -e ".[plots]" or pip install matplotlib')


def matplotlib_missing() -> bool:
    """Say (once) that matplotlib is missing; False, for ``return matplotlib_missing()`` in a plot function."""
    warnings.warn(MISSING, UserWarning, stacklevel=1)  # stacklevel 1: one location, so shown once
    return False
