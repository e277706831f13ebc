"""The profiler (minipeft/profiler.py, ``minipeft profile``): its op counts equal a hand count,
its FLOPs are 2·m·n·k per product, its times fit in the wall time, it changes no result, and
it leaves the engine exactly as it found it. No timings are asserted beyond their order."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft import threads
from minipeft.autograd.function import Function
from minipeft.autograd.fused import IGNORE_INDEX, linear_cross_entropy, low_rank_linear
from minipeft.autograd.fused.layers import Linear
from minipeft.cli import main
from minipeft.profiler import matmul_flops, profile_generation, profile_step, profiling

LAYERS = 2
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(seed=0):
    config = mp.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return mp.LlamaForCausalLM(config, rng=np.random.default_rng(seed))


def batch():
    return np.random.default_rng(1).integers(0, 64, size=(2, 8))


def calls(report, name):
    stats = report.ops[name]
    return stats.forward_calls // report.steps, stats.backward_calls // report.steps


def test_full_fine_tune_op_counts_equal_a_hand_count():
    report = profile_step(tiny_model(), batch(), steps=2, warmup=0, memory=False, gemm_peak=False)
    # every weight trains, so every op that ran forward runs backward once
    assert calls(report, "Linear") == (7 * LAYERS,) * 2  # seven projections per layer
    assert calls(report, "Attention") == (LAYERS, LAYERS)
    assert calls(report, "Rope") == (2 * LAYERS,) * 2  # queries and keys
    assert calls(report, "RMSNorm") == (2 * LAYERS + 1,) * 2  # two per layer + the final norm
    assert calls(report, "SiluMul") == (LAYERS, LAYERS)
    assert calls(report, "LinearCrossEntropy") == (1, 1)  # the head and the loss, fused in training
    assert calls(report, "Embedding") == (1, 1)


def test_lora_op_counts_equal_a_hand_count():
    model = mp.peft.get_peft_model(tiny_model(), mp.peft.LoraConfig(r=2, target_modules=PROJECTIONS))
    report = profile_step(model, batch(), steps=1, warmup=1, memory=False, gemm_peak=False)
    # each adapted projection is one fused op (base + branch); the head is LinearCrossEntropy
    assert calls(report, "LowRankLinear") == (7 * LAYERS, 7 * LAYERS)  # every one has trainable A, B
    assert "Linear" not in report.ops
    assert calls(report, "Embedding") == (1, 0)  # frozen: no backward


def test_forward_only_runs_no_backward_and_no_optimizer():
    model = tiny_model()
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    report = profile_step(model, batch(), steps=1, train=False, memory=False, gemm_peak=False)
    assert calls(report, "Linear") == (7 * LAYERS + 1, 0)  # without gradients the head is a plain Linear
    assert report.ops["Linear"].backward_flops == 0 and report.optimizer_s == 0
    assert all(np.array_equal(p.data, before[name]) for name, p in model.named_parameters())


def test_times_are_non_negative_and_fit_in_the_wall_time():
    report = profile_step(tiny_model(), batch(), steps=2, memory=True, gemm_peak=True)
    for stats in report.ops.values():
        assert stats.forward_s >= 0 and stats.backward_s >= 0
    assert report.optimizer_s >= 0 and report.other_s >= 0
    assert report.ops_s + report.optimizer_s <= report.wall_s
    assert len(report.step_s) == 2 and all(np.isfinite(report.losses))
    assert report.gemm_peak_flops > 0 and report.peak_traced_bytes > 0
    text = report.format()
    for needle in ("Linear", "Attention", "optimizer", "other", "GEMM ops", "measured peak", "tracemalloc"):
        assert needle in text


def test_the_header_names_the_blas_and_its_kernels(monkeypatch):
    # The same BLAS runs different kernels by CPU (or OPENBLAS_CORETYPE): the report says which.
    fake = [{"user_api": "blas", "internal_api": "openblas", "version": "0.3.31", "architecture": "Haswell",
             "num_threads": 1},
            {"user_api": "openmp", "internal_api": "openmp", "version": None, "num_threads": 2}]

    class FakeController:
        def info(self):
            return fake

    monkeypatch.setattr(threads, "_controller", FakeController)
    assert threads.blas_library() == "OpenBLAS 0.3.31, Haswell kernels"
    fake[0] = dict(fake[0], internal_api="mkl", architecture=None)
    assert threads.blas_library() == "MKL 0.3.31"
    fake.pop(0)
    assert threads.blas_library() is None
    monkeypatch.undo()

    report = profile_step(tiny_model(), batch(), steps=1, memory=False, gemm_peak=False)
    assert report.blas == threads.blas_library()
    header = report.format().splitlines()[0]
    assert (f"({report.blas})" in header) == bool(report.blas)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 6), n=st.integers(1, 6), batch_axes=st.integers(0, 2),
       grads=st.sampled_from([(True, True), (True, False), (False, True)]))
def test_matmul_flops_are_2mnk_per_product(m, k, n, batch_axes, grads):
    lead = (2,) * batch_axes
    a = mp.Tensor(np.ones(lead + (m, k), np.float32), requires_grad=grads[0])
    b = mp.Tensor(np.ones((k, n), np.float32), requires_grad=grads[1])
    with profiling() as ops:
        (a @ b).sum().backward()
    products = 2 ** batch_axes
    assert matmul_flops(a.shape, b.shape) == 2 * m * n * k * products
    assert ops["MatMul"].forward_flops == 2 * m * n * k * products
    assert ops["MatMul"].backward_flops == 2 * m * n * k * products * sum(grads)  # one product per gradient


def test_linear_flops_and_bytes():
    x = mp.Tensor(np.ones((3, 5, 4), np.float32), requires_grad=True)
    w = mp.Tensor(np.ones((6, 4), np.float32), requires_grad=False)
    with profiling() as ops:
        Linear.apply(x, w).reshape(15, 6).sum().backward()
    assert ops["Linear"].forward_flops == ops["Linear"].backward_flops == 2 * 15 * 6 * 4  # dW skipped: frozen
    assert ops["Linear"].forward_bytes == 15 * 6 * 4  # its (3, 5, 6) float32 output
    assert ops["Reshape"].forward_bytes == 0  # a view of its input allocates nothing
    shape = ops.shapes["Linear 15x4 -> 6"]  # the same product, listed by its shape
    assert (shape.forward_calls, shape.backward_calls, shape.flops) == (1, 1, 2 * 2 * 15 * 6 * 4)


@pytest.mark.parametrize("trained", [(True, False), (True, True), (False, False)])
def test_linear_cross_entropy_flops_are_all_in_forward(trained):
    """The fused head + loss does its gradient products in forward: one 2·N·D·V product for
    the logits and one for each gradient wanted (dh, dW); backward only scales them."""
    rows, width, vocab = 6, 4, 9
    h = mp.Tensor(np.ones((rows, width), np.float32), requires_grad=trained[0])
    w = mp.Tensor(np.ones((vocab, width), np.float32), requires_grad=trained[1])
    with profiling() as ops:
        loss = linear_cross_entropy(h, w, np.arange(rows))
        if any(trained):
            loss.backward()
    assert ops["LinearCrossEntropy"].forward_flops == 2 * rows * width * vocab * (1 + sum(trained))
    assert ops["LinearCrossEntropy"].backward_flops == 0


def test_linear_cross_entropy_flops_count_only_the_kept_rows():
    """Rows whose label is ignored are not multiplied, and not counted."""
    rows, width, vocab = 6, 4, 9
    h = mp.Tensor(np.ones((rows, width), np.float32), requires_grad=True)
    w = mp.Tensor(np.ones((vocab, width), np.float32))
    labels = np.array([0, IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5])
    with profiling() as ops:
        linear_cross_entropy(h, w, labels).backward()
    assert ops["LinearCrossEntropy"].forward_flops == 2 * 4 * width * vocab * 2


def test_low_rank_linear_flops_are_a_hand_count():
    """x (6, 4), W (5, 4) frozen, A (2, 4), B (5, 2): forward x Wᵀ, x Aᵀ, u Bᵀ; backward
    g W, g B (once), (g B) A, dA = (g B)ᵀ x, dB = gᵀ u."""
    x = mp.Tensor(np.ones((6, 4), np.float32), requires_grad=True)
    w = mp.Tensor(np.ones((5, 4), np.float32))
    a, b = (mp.Tensor(np.ones(shape, np.float32), requires_grad=True) for shape in ((2, 4), (5, 2)))
    with profiling() as ops:
        low_rank_linear(x, w, a, b, 0.5).sum().backward()
    xw, xa, ub = 2 * 6 * 4 * 5, 2 * 6 * 4 * 2, 2 * 6 * 2 * 5
    assert ops["LowRankLinear"].forward_flops == xw + xa + ub
    assert ops["LowRankLinear"].backward_flops == xw + ub + xa + xa + ub


def test_profiling_changes_no_loss_and_no_gradient_bitwise():
    model = mp.peft.get_peft_model(tiny_model(), mp.peft.LoraConfig(r=2, target_modules=PROJECTIONS))
    ids = batch()

    def loss_and_grads():
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {name: p.grad.copy() for name, p in model.named_parameters() if p.grad is not None}
        for p in model.parameters():
            p.grad = None
        return loss.numpy().copy(), grads

    plain_loss, plain_grads = loss_and_grads()
    with profiling():
        profiled_loss, profiled_grads = loss_and_grads()
    assert plain_loss.tobytes() == profiled_loss.tobytes()
    assert plain_grads.keys() == profiled_grads.keys() and plain_grads
    for name in plain_grads:
        assert plain_grads[name].tobytes() == profiled_grads[name].tobytes(), name


def _methods():
    todo, found = [Function], {}
    while todo:
        for sub in todo.pop().__subclasses__():
            found[sub] = (sub.__dict__.get("forward"), sub.__dict__.get("backward"))
            todo.append(sub)
    return found


class _Scale(Function):  # an op defined by a user, with its own forward and backward
    def forward(self, a):
        return a * 2

    def backward(self, g):
        return g * 2


class _ScaleAgain(_Scale):  # inherits backward, extends forward through super()
    def forward(self, a):
        return super().forward(a) + 0


class _Both(_ScaleAgain, _Scale):  # met twice when walking the subclasses
    pass


def test_user_ops_and_super_calls_are_counted_once():
    x = mp.Tensor(np.ones(3, np.float32), requires_grad=True)
    with profiling() as ops:
        _ScaleAgain.apply(_Both.apply(x)).sum().backward()
    assert (ops["_ScaleAgain"].forward_calls, ops["_ScaleAgain"].backward_calls) == (1, 1)
    assert (ops["_Both"].forward_calls, ops["_Both"].backward_calls) == (1, 1)
    assert "_Scale" not in ops


def test_the_engine_runs_its_own_methods_outside_the_profiler():
    before = _methods()
    with pytest.raises(KeyError):
        with profiling():
            assert _methods() != before  # wrapped inside
            with pytest.raises(RuntimeError, match="nested"):
                with profiling():
                    pass
            raise KeyError("an error inside the block")
    assert _methods() == before  # and restored, even after an error


def test_generation_is_profiled_per_token():
    model = tiny_model()
    report = profile_generation(model, np.array([[1, 5, 7]]), new_tokens=6, warmup=0, gemm_peak=False)
    assert report.unit == "token" and report.steps == 6 and len(report.step_s) == 6
    assert calls(report, "Linear") == (7 * LAYERS + 1, 0)  # the projections and the head, once a token
    assert calls(report, "Attention") == (LAYERS, 0) and report.optimizer_s == 0
    assert all(t > 0 for t in report.step_s) and report.ops_s <= report.wall_s
    assert report.format().startswith("6 token(s), ") and "ms per token" in report.format()


# ----- the command line ------------------------------------------------------------------
def test_cli_prints_the_table_and_exits_0(capsys, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(str(folder))
    code = main(["profile", "--model", str(folder), "--batch", "2", "--seq", "8", "--steps", "1",
                 "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Linear" in out and "GEMM ops" in out and "peak memory" in out
    assert "profiling lora" in err


@pytest.mark.parametrize("flags, flag", [
    (("--batch", "0"), "--batch"), (("--seq", "x"), "--seq"), (("--steps", "-1"), "--steps"),
    (("--warmup", "-1"), "--warmup"),
    (("--method", "bogus"), "--method"), (("--threads", "0"), "--threads"),
])
def test_bad_flags_are_one_error_line(capsys, flags, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", *flags])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0], errors


def test_a_device_other_than_the_cpu_is_one_error_line(capsys):
    assert main(["profile", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minipeft: error: --device cuda"), err


def test_cli_profiles_generation(capsys, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(str(folder))
    code = main(["profile", "--model", str(folder), "--generate", "5", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("5 token(s), ") and "Linear" in out and "GEMM ops" in out
    assert "greedy decoding" in err
