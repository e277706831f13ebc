"""BLAS threads as a setting: how many threads NumPy's matrix products may use.

NumPy's BLAS (OpenBLAS in the wheels) starts one thread per CPU by default, and its
threads spin while they wait for work. On a machine that runs something else beside the
fine-tune (another job, a browser, a second training run), those spinning threads fight
for the same cores and a run becomes several times slower: ``examples/lora_zoe.py`` took
189 s with the BLAS default and 28 s with one thread on a loaded 2-core machine. Measured
again for this module (30 LoRA steps of that example, a 2-core machine that other jobs
shared, seconds; two rounds)::

    BLAS threads          alone          beside a busy loop (python -c "while True: pass")
    1                     7.9, 10.2      12.6, 14.7
    2                     18.8, 28.1     28.1, 82.5
    BLAS default (2)      24.3, 45.3     18.0, 80.3

One thread was the fastest in every case, up to 5.6 times. On a quiet machine (``minipeft
train --steps 30`` on the bundled model, whole process, A/B interleaved, medians of 5): alone,
1 thread 5.37 s and 2 threads 5.04 s; beside a busy loop, 1 thread 5.03 s and 2 threads 9.11 s. The small matrices of a small
model do not pay back more threads; on larger machines half the CPUs leaves room for the
other work (not measured here: only a 2-core machine was at hand).

So minipeft chooses, unless the user did:

* ``set_num_threads(n)`` / ``--threads N`` / ``TrainingArguments(threads=N)``: N threads;
* else, when one of the BLAS's own variables (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
  ``MKL_NUM_THREADS``) is set, the BLAS keeps what it read from it;
* else :func:`default_num_threads`: half the CPUs this process may run on, at most 4,
  at least 1 (1 on a 2-core machine).

Limits are set with threadpoolctl (the scikit-learn project's library), which reaches the
BLAS that NumPy actually loaded; CuPy runs on the GPU and is not affected.
"""
from __future__ import annotations

import contextlib
import os

from .errors import ConfigError

BLAS_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def default_num_threads() -> int:
    """Half the available CPUs, between 1 and 4: a run on a shared machine leaves the other
    half to the other work, and a small model gains little from more (README.md, "Threads")."""
    return max(1, min(4, available_cpus() // 2))


def _check(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of threads must be an integer >= 1, got {n!r}")
    return n


def _controller():
    from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - only when a limit is set

    return ThreadpoolController()


def set_num_threads(n: int) -> None:
    """Let NumPy's BLAS use ``n`` threads from now on, in this process."""
    _controller().limit(limits=_check(n), user_api="blas")


def get_num_threads() -> int | None:
    """The BLAS's current thread count (the largest, if NumPy loaded several); None without one."""
    counts = [info["num_threads"] for info in _controller().info() if info["user_api"] == "blas"]
    return max(counts) if counts else None


def blas_library() -> str | None:
    """NumPy's BLAS in words, e.g. "OpenBLAS 0.3.31.188.0, SkylakeX kernels"; None without one.

    OpenBLAS picks its kernels by the CPU when it loads, or by ``OPENBLAS_CORETYPE`` when that is
    set before NumPy is imported; which ones run matters for speed (README.md, "BLAS kernels")."""
    found = []
    for info in _controller().info():
        if info["user_api"] != "blas":
            continue
        name = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}.get(info["internal_api"], info["internal_api"])
        words = f"{name} {info['version']}" if info.get("version") else name
        if info.get("architecture"):
            words += f", {info['architecture']} kernels"
        found.append(words)
    return "; ".join(found) or None


def chosen_num_threads(n: int | None = None) -> int | None:
    """The count to use: ``n`` when given; None (leave the BLAS alone) when a BLAS variable is
    set in the environment; else :func:`default_num_threads`."""
    if n is not None:
        return _check(n)
    if any(os.environ.get(name) for name in BLAS_ENV_VARS):
        return None
    return default_num_threads()


@contextlib.contextmanager
def num_threads(n: int | None = None):
    """Within the block, the BLAS uses :func:`chosen_num_threads` (n) threads; restored after."""
    n = chosen_num_threads(n)
    if n is None:
        yield
        return
    with _controller().limit(limits=n, user_api="blas"):
        yield
