"""The profiler's results: op totals (:class:`OpStats`), the report and its table, and the
machine's GEMM peak that the report compares the step's GEMMs with (minipeft/profiler.py
collects the numbers; this module keeps and prints them)."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np


@dataclasses.dataclass
class OpStats:
    """One op class's totals over the profiled steps (times in seconds)."""

    forward_calls: int = 0
    backward_calls: int = 0
    forward_s: float = 0.0
    backward_s: float = 0.0
    forward_bytes: int = 0
    backward_bytes: int = 0
    forward_flops: int = 0
    backward_flops: int = 0

    def add(self, direction: str, seconds: float, nbytes: int, flops: int) -> None:
        """One call's share, ``direction`` "forward" or "backward"."""
        setattr(self, f"{direction}_calls", getattr(self, f"{direction}_calls") + 1)
        setattr(self, f"{direction}_s", getattr(self, f"{direction}_s") + seconds)
        setattr(self, f"{direction}_bytes", getattr(self, f"{direction}_bytes") + nbytes)
        setattr(self, f"{direction}_flops", getattr(self, f"{direction}_flops") + flops)

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def flops(self) -> int:
        return self.forward_flops + self.backward_flops


class OpTable(dict):
    """``{op class name: OpStats}``, and in ``shapes`` the GEMM ops again per shape
    (``"Linear 2048x288 -> 32000"``: which products the GEMM time goes to)."""

    def __init__(self):
        super().__init__()
        self.shapes: dict[str, OpStats] = {}


# ----- the machine's GEMM peak -----------------------------------------------------------
def measure_gemm_peak(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` float32 (size × size) @ (size × size) products
    in NumPy, at the BLAS thread count in effect: the ceiling a step's GEMMs can reach."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = a @ b  # warm-up: threads started, pages touched
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ----- the report ------------------------------------------------------------------------
@dataclasses.dataclass
class ProfileReport:
    """Totals over ``steps`` profiled training steps; :meth:`format` prints them as a table."""

    ops: OpTable  # {op class name: OpStats}; ops.shapes: the GEMM ops per shape
    steps: int
    step_s: list[float]  # wall time of each profiled step
    optimizer_s: float  # optimizer.step() + zero_grad(), all steps
    gemm_peak_flops: float | None  # measured FLOP/s of a large NumPy GEMM; None if not measured
    peak_traced_bytes: int | None  # tracemalloc's peak during one extra step; None if not measured
    peak_rss_bytes: int | None  # the process's peak resident memory (ru_maxrss)
    threads: int | None  # BLAS threads during the steps
    blas: str | None = None  # NumPy's BLAS and the kernels it runs (threads.blas_library)
    unit: str = "step"  # what one of ``steps`` is: a training "step", or a generated "token"
    losses: list[float] = dataclasses.field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return sum(self.step_s)

    @property
    def ops_s(self) -> float:
        return sum(s.total_s for s in self.ops.values())

    @property
    def other_s(self) -> float:
        """Step time outside the ops and the optimizer: Python module code, the graph walk."""
        return max(0.0, self.wall_s - self.ops_s - self.optimizer_s)

    @property
    def gemm_flops(self) -> int:
        return sum(s.flops for s in self.ops.values())

    @property
    def gemm_s(self) -> float:
        return sum(s.total_s for s in self.ops.values() if s.flops)

    @property
    def gemm_ops(self) -> list[str]:
        """The ops whose FLOPs are counted (Linear, MatMul, Attention) that ran."""
        return [name for name, s in self.ops.items() if s.flops]

    def format(self, shapes: int = 8) -> str:
        """The table; then the ``shapes`` GEMM shapes that took the most time."""
        steps, wall, unit = self.steps, self.wall_s, self.unit
        per_step = 1.0 / steps
        lines = [
            f"{steps} {unit}(s), {wall * per_step * 1e3:.1f} ms per {unit}"
            + (f", {self.threads} BLAS thread(s)" if self.threads else "")
            + (f" ({self.blas})" if self.blas else "")
            + f"; per {unit}: ms and % of the {unit}, MB allocated (arrays returned), calls",
            f"{'op':<14} {'fwd ms':>8} {'bwd ms':>8} {'total %':>7} {'fwd MB':>8} {'bwd MB':>8} "
            f"{'calls f/b':>11} {'GFLOP/s':>8}",
        ]
        for name, s in sorted(self.ops.items(), key=lambda item: -item[1].total_s):
            rate = f"{s.flops / s.total_s / 1e9:8.1f}" if s.flops and s.total_s > 0 else f"{'':>8}"
            calls = f"{s.forward_calls // steps}/{s.backward_calls // steps}"
            lines.append(
                f"{name:<14} {s.forward_s * per_step * 1e3:8.1f} {s.backward_s * per_step * 1e3:8.1f} "
                f"{100 * s.total_s / wall:6.1f}% {s.forward_bytes * per_step / 2**20:8.1f} "
                f"{s.backward_bytes * per_step / 2**20:8.1f} {calls:>11} {rate}")
        for name, seconds in (("optimizer", self.optimizer_s), ("other", self.other_s)):
            lines.append(f"{name:<14} {seconds * per_step * 1e3:17.1f} {100 * seconds / wall:6.1f}%")
        forward = sum(s.forward_s for s in self.ops.values())
        backward = sum(s.backward_s for s in self.ops.values())
        lines.append(f"ops: forward {forward * per_step * 1e3:.1f} ms, backward {backward * per_step * 1e3:.1f} ms"
                     f" per {unit} ({100 * self.ops_s / wall:.0f}% of the {unit})")
        if self.gemm_flops:
            achieved = self.gemm_flops / self.gemm_s if self.gemm_s > 0 else 0.0
            line = (f"GEMM ops ({', '.join(self.gemm_ops)}): "
                    f"{self.gemm_flops * per_step / 1e9:.2f} GFLOP per {unit}, {achieved / 1e9:.1f} GFLOP/s")
            if self.gemm_peak_flops:
                floor = self.gemm_flops * per_step / self.gemm_peak_flops
                line += (f" = {100 * achieved / self.gemm_peak_flops:.0f}% of the measured peak "
                         f"{self.gemm_peak_flops / 1e9:.1f} GFLOP/s (1024³ float32 NumPy matmul); "
                         f"at that peak the {unit}'s GEMMs would take {floor * 1e3:.1f} ms, "
                         f"{100 * floor / (wall * per_step):.0f}% of the {unit}")
            lines.append(line)
        top = sorted(self.ops.shapes.items(), key=lambda item: -item[1].total_s)[:shapes]
        if top:
            lines.append(f"GEMM shapes, the {len(top)} slowest of {len(self.ops.shapes)} "
                         f"(per {unit}: fwd ms, bwd ms, % of the {unit}, calls, GFLOP/s):")
            width = max(len(label) for label, _ in top)
            for label, s in top:
                rate = s.flops / s.total_s / 1e9 if s.total_s > 0 else 0.0
                lines.append(f"  {label:<{width}} {s.forward_s * per_step * 1e3:8.1f} "
                             f"{s.backward_s * per_step * 1e3:8.1f} {100 * s.total_s / wall:6.1f}% "
                             f"{s.forward_calls // steps:>5}/{s.backward_calls // steps:<4} {rate:7.1f}")
        if self.peak_traced_bytes is not None:
            lines.append(f"peak memory allocated during a step (tracemalloc, weights excluded): "
                         f"{self.peak_traced_bytes / 2**20:.1f} MB")
        if self.peak_rss_bytes is not None:
            lines.append(f"peak resident memory of the process so far (ru_maxrss): "
                         f"{self.peak_rss_bytes / 2**20:.1f} MB")
        return "\n".join(lines)


def peak_rss_bytes() -> int | None:
    try:
        import resource  # noqa: PLC0415 - not on Windows
    except ImportError:
        return None
    import sys  # noqa: PLC0415

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB
