"""Where a training step's time and memory go: time, bytes and FLOPs per autograd op.

    import minipeft as mp
    report = mp.profile_step(peft_model, input_ids, steps=3)
    print(report.format())

:func:`profile_step` runs a few training steps (forward, backward, optimizer) inside
:func:`profiling`, which times every :class:`~minipeft.autograd.function.Function`'s
``forward`` and ``backward`` by op class (Linear, Attention, CrossEntropy, ...). Every
op runs through those two methods (``Function.apply`` calls ``forward``,
``Tensor.backward`` calls ``backward``), so wrapping them is the one place that sees
every op. The wrappers are put on the classes when :func:`profiling` starts and taken
off when it ends: with the profiler off the engine runs its own, unchanged methods, so
profiling costs nothing when it is not used (not even a flag check per op).

What is counted, per op class and direction:

* time: the op's own time (an op that calls another op's method, e.g. ``super()``,
  is counted once); what is left of the step's wall time is the optimizer and
  "other" (module code in Python, the graph walk, accumulating gradients);
* bytes: the memory of the arrays an op returns that it allocated (a view of an
  input, such as Reshape's output or a gradient passed through, counts 0); the
  temporaries inside an op are not seen;
* FLOPs of the GEMM ops (Linear, MatMul, Attention's products; 2·m·n·k per product,
  Attention counting only the causal half it computes), and their FLOP/s next to the
  machine's GEMM peak, measured by :func:`measure_gemm_peak` at the current BLAS
  thread count;
* peak memory: the peak of NumPy's allocations during one extra, untimed step under
  ``tracemalloc`` (weights allocated before it are not included), and the process's
  peak resident memory (``ru_maxrss``, everything since the process started).
"""
from __future__ import annotations

import contextlib
import math
import time
import tracemalloc

import numpy as np

from .autograd.fused import IGNORE_INDEX
from .autograd.function import Function
from .autograd.tensor import no_grad
from .backend import to_numpy
from .profile_report import OpStats, OpTable, ProfileReport, measure_gemm_peak, peak_rss_bytes

__all__ = ["OpStats", "ProfileReport", "measure_gemm_peak", "profile_step", "profiling"]


# ----- FLOP counts of the GEMM ops: (forward, backward, shape label) from the forward's arguments
def _linear_flops(fn, x, weight, bias=None):
    rows = x.size // x.shape[-1]
    product = 2 * rows * x.shape[-1] * weight.shape[0]
    label = f"Linear {rows}x{x.shape[-1]} -> {weight.shape[0]}"
    return product, product * sum(map(bool, fn.needs_input_grad[:2])), label  # dx and dW: a product each


def matmul_flops(a_shape, b_shape) -> int:
    """2·m·n·k for each matrix product of ``a @ b`` (NumPy's rules: batch axes broadcast,
    a 1-D operand is a row or a column)."""
    m = a_shape[-2] if len(a_shape) > 1 else 1
    n = b_shape[-1] if len(b_shape) > 1 else 1
    batch = math.prod(np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2])))
    return 2 * batch * m * n * a_shape[-1]


def _matmul_flops(fn, a, b):
    product = matmul_flops(a.shape, b.shape)
    label = f"MatMul {'x'.join(map(str, a.shape))} @ {'x'.join(map(str, b.shape))}"
    return product, product * sum(map(bool, fn.needs_input_grad[:2])), label


def _attention_flops(fn, q, k, v, bias, causal_only=False):
    # causal: query t of T (the last T of S positions) reads S − T + t + 1 keys
    batch, heads, tq, dh = q.shape
    tk = k.shape[2]
    pairs = tq * (tk - tq) + tq * (tq + 1) // 2
    product = 2 * batch * heads * dh * pairs
    # forward: scores and probs @ v; backward: dV, dP, dQ and dK
    label = f"Attention B{batch} H{heads}/{k.shape[1]} T{tq} S{tk} Dh{dh}"
    return 2 * product, (4 * product if any(fn.needs_input_grad) else 0), label


def _linear_cross_entropy_flops(fn, h, weight, labels, ignore_index=IGNORE_INDEX):
    # the logits' product, and (in forward too) the products of dh and dW that are wanted,
    # over the rows whose label counts (the op skips the others)
    rows = int((to_numpy(labels).reshape(-1) != ignore_index).sum())
    product = 2 * rows * h.shape[-1] * weight.shape[0]
    label = f"LinearCrossEntropy {rows}x{h.shape[-1]} -> {weight.shape[0]}"
    return product * (1 + sum(map(bool, fn.needs_input_grad[:2]))), 0, label


def _low_rank_linear_flops(fn, x, weight, A, B, bias=None, scale=1.0):
    rows, width, out, rank = x.size // x.shape[-1], x.shape[-1], weight.shape[0], A.shape[0]
    base, down, up = 2 * rows * width * out, 2 * rows * width * rank, 2 * rows * rank * out  # x Wᵀ, x Aᵀ, u Bᵀ
    need = fn.needs_input_grad
    backward = ((base + up + down) * need[0] + base * need[1]  # dx = g W + (g B) A; dW
                + (up + down) * need[2] + up * need[3]) if any(need) else 0  # dA needs g B; dB = gᵀ u
    if need[2] and need[0]:
        backward -= up  # g B is formed once for dx and dA
    label = f"LowRankLinear {rows}x{width} -> {out} (r {rank})"
    return base + down + up, backward, label


FLOP_COUNTERS = {"Linear": _linear_flops, "MatMul": _matmul_flops, "Attention": _attention_flops,
                 "LinearCrossEntropy": _linear_cross_entropy_flops, "LowRankLinear": _low_rank_linear_flops}


# ----- the instrumentation ---------------------------------------------------------------
class _Recorder:
    def __init__(self):
        self.stats = OpTable()
        self.stack: list[list] = []  # [function, time spent in ops it called]
        self.backward_flops: dict[int, tuple] = {}  # id(function) -> (its backward's FLOPs, shape label)

    @staticmethod
    def row(table, name) -> OpStats:
        stats = table.get(name)
        if stats is None:
            stats = table[name] = OpStats()
        return stats

    def run(self, fn, method, args, params, backward: bool):
        if self.stack and self.stack[-1][0] is fn:  # super().forward(...): counted by the caller
            return method(fn, *args, **params)
        frame = [fn, 0.0]
        self.stack.append(frame)
        start = time.perf_counter()
        try:
            out = method(fn, *args, **params)
        finally:
            elapsed = time.perf_counter() - start
            self.stack.pop()
            if self.stack:
                self.stack[-1][1] += elapsed
        own = elapsed - frame[1]
        new_bytes = _allocated_bytes(out, args if not backward else args + tuple(_saved_arrays(fn)))
        rows = [self.row(self.stats, type(fn).__name__)]
        if backward:
            flops, label = self.backward_flops.pop(id(fn), (0, None))
            if label is not None:
                rows.append(self.row(self.stats.shapes, label))
        else:
            counter = FLOP_COUNTERS.get(type(fn).__name__)
            flops = 0
            if counter is not None:
                flops, backward_flops, label = counter(fn, *args, **params)
                self.backward_flops[id(fn)] = (backward_flops, label)
                rows.append(self.row(self.stats.shapes, label))
        for stats in rows:
            stats.add("backward" if backward else "forward", own, new_bytes, flops)
        return out


def _owner(array):
    while getattr(array, "base", None) is not None:
        array = array.base
    return array


def _arrays(value):
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _arrays(item)
    elif hasattr(value, "nbytes") and hasattr(value, "shape"):
        yield value


def _saved_arrays(fn):
    return tuple(_arrays(getattr(fn, "saved", ())))


def _allocated_bytes(out, inputs) -> int:
    """Bytes of the memory ``out``'s arrays own that none of ``inputs`` owns."""
    seen = {id(_owner(a)) for a in _arrays(inputs)}
    total = 0
    for array in _arrays(out):
        owner = _owner(array)
        if id(owner) not in seen:
            seen.add(id(owner))
            total += int(getattr(owner, "nbytes", 0))
    return total


def _function_classes():
    """Every subclass of Function, once each (a class with two Function bases is met twice)."""
    found, todo = {}, [Function]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found[sub] = None
                todo.append(sub)
    return list(found)


def _wrap(recorder, method, backward: bool):
    if backward:
        def timed(self, grad):
            return recorder.run(self, method, (grad,), {}, True)
    else:
        def timed(self, *arrays, **params):
            return recorder.run(self, method, arrays, params, False)
    timed.profiled = True  # how a second profiling() sees that one is running
    return timed


@contextlib.contextmanager
def profiling():
    """Within the block, every op's forward and backward is timed; yields the ``{op class
    name: OpStats}`` dict it fills (its ``shapes`` attribute: the GEMM ops per shape). Not
    re-entrant (one profile at a time). The op classes are wrapped when the block starts, so
    a Function subclass first defined inside the block is not timed."""
    classes = _function_classes()
    if any(getattr(cls.__dict__.get("forward"), "profiled", False) for cls in classes):
        raise RuntimeError("profiling() is already running; it cannot be nested")
    recorder = _Recorder()
    patched = []  # (class, method name, its own method): restored on the way out
    for cls in classes:
        for name in ("forward", "backward"):
            method = cls.__dict__.get(name)
            if method is not None:
                patched.append((cls, name, method))
                setattr(cls, name, _wrap(recorder, method, name == "backward"))
    try:
        yield recorder.stats
    finally:
        for cls, name, method in reversed(patched):
            setattr(cls, name, method)


def default_optimizer(model, lr: float = 1e-4):
    """AdamW over a PeftModel's parameter groups, or over every trainable parameter."""
    from .train.optim import AdamW  # noqa: PLC0415

    if hasattr(model, "parameter_groups"):
        return AdamW(model.parameter_groups(), lr=lr)
    return AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def profile_step(model, input_ids, labels=None, *, steps: int = 3, warmup: int = 1, optimizer=None,
                 memory: bool = True, gemm_peak: bool = True, train: bool = True) -> ProfileReport:
    """Run ``warmup`` unprofiled then ``steps`` profiled training steps of ``model`` (a
    PeftModel or a LlamaForCausalLM) on ``input_ids`` (labels: the inputs, shifted inside
    the model, unless given), then one untimed step under tracemalloc when ``memory``.

    A step is ``model(ids, labels=labels).loss.backward(); optimizer.step();
    optimizer.zero_grad()`` with ``optimizer`` (default: AdamW, lr 1e-4); the steps do
    update the model. The profiler changes no result: losses and gradients are bitwise
    those of an unprofiled step. ``train=False`` profiles the forward alone, without
    gradients (``no_grad``: what evaluation and generation run), and no optimizer.
    """
    from .allocator import keep_freed_memory  # noqa: PLC0415
    from .threads import blas_library, get_num_threads  # noqa: PLC0415

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    keep_freed_memory()  # the memory behaviour of Trainer.train(), so the times are the trainer's
    labels = input_ids if labels is None else labels
    optimizer = (optimizer or default_optimizer(model)) if train else None
    optimizer_s = 0.0

    def step():
        if not train:
            with no_grad():
                return float(model(input_ids, labels=labels).loss.item()), 0.0
        loss = model(input_ids, labels=labels).loss
        loss.backward()
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.item()), time.perf_counter() - start

    for _ in range(warmup):
        step()
    step_s, losses = [], []
    with profiling() as ops:
        for _ in range(steps):
            start = time.perf_counter()
            loss, spent = step()
            step_s.append(time.perf_counter() - start)
            optimizer_s += spent
            losses.append(loss)
    peak_traced = None
    if memory:
        tracemalloc.start()
        try:
            step()
            peak_traced = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return ProfileReport(
        ops=ops, steps=steps, step_s=step_s, optimizer_s=optimizer_s,
        gemm_peak_flops=measure_gemm_peak() if gemm_peak else None, peak_traced_bytes=peak_traced,
        peak_rss_bytes=peak_rss_bytes(), threads=get_num_threads(), blas=blas_library(), losses=losses)


def profile_generation(model, prompt_ids, *, new_tokens: int = 64, warmup: int = 1,
                       gemm_peak: bool = True) -> ProfileReport:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt_ids`` (KV cache on, never stopping
    early), timed per op like :func:`profile_step`; the report's unit is a generated token (the
    first one carries the prompt's forward). ``warmup`` unprofiled generations run first."""
    from .threads import blas_library, get_num_threads  # noqa: PLC0415

    if new_tokens < 1 or warmup < 0:
        raise ValueError(f"new_tokens must be >= 1 and warmup >= 0, got {new_tokens} and {warmup}")
    prompt_ids = np.asarray(prompt_ids)
    for _ in range(warmup):
        model.generate(prompt_ids, max_new_tokens=new_tokens, eos_token_id=-1)
    arrived = []
    with profiling() as ops:
        start = time.perf_counter()
        model.generate(prompt_ids, max_new_tokens=new_tokens, eos_token_id=-1,
                       streamer=lambda _ids: arrived.append(time.perf_counter()))
    token_s = list(np.diff([start, *arrived]))
    return ProfileReport(
        ops=ops, steps=len(token_s), step_s=token_s, optimizer_s=0.0,
        gemm_peak_flops=measure_gemm_peak() if gemm_peak else None, peak_traced_bytes=None,
        peak_rss_bytes=peak_rss_bytes(), threads=get_num_threads(), blas=blas_library(), unit="token")
