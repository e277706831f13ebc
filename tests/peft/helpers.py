"""Shared helpers for the PEFT tests: tiny random models, adapter randomisation,
finite-difference gradient checks over model parameters, and the torch oracles.

Nothing here imports torch at module level; the oracle helpers skip the test with
the reason when torch / transformers / peft are missing.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

import minipeft as mp
from tests.helpers.hf import randomize_hf_weights
from minipeft.autograd import no_grad
from minipeft.backend import to_numpy
from minipeft.peft.lowrank import dora
from tests.helpers.gradcheck import numerical_gradient, weighted_sum

# A tiny LLaMA (4 query heads over 2 key/value heads, head_dim 8), and a tinier one for
# finite differences (every parameter element costs two forward passes).
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
TINIER = dict(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, rms_norm_eps=1e-5)


def tiny_model(seed: int = 0, dtype=np.float32, size=TINY, **overrides) -> mp.LlamaForCausalLM:
    """A random minipeft model; the same seed gives the same weights."""
    config = mp.LlamaConfig(**{**size, **overrides})
    model = mp.LlamaForCausalLM(config, rng=np.random.default_rng(seed))
    if overrides.get("attention_bias") or overrides.get("mlp_bias"):  # Linear starts biases at zero
        rng = np.random.default_rng(seed + 1000)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.data = rng.normal(0, 0.2, p.shape).astype(p.dtype)
    return model.to(dtype=dtype)


def token_ids(seed: int = 1, batch: int = 2, length: int = 6, vocab: int = TINY["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def randomize(peft_model, seed: int = 3, scale: float = 0.3, names=None) -> None:
    """Add N(0, scale²) noise to every parameter of the given adapters (default: all), so
    that B ≠ 0 and every path of the adapter is exercised."""
    rng = np.random.default_rng(seed)
    for path, module in peft_model.named_adapter_modules():
        for name in module.adapter_names():
            if names is None or name in names:
                for p in module.adapter_state(name).values():
                    p.data = (to_numpy(p.data) + rng.normal(0, scale, p.shape)).astype(p.dtype)


def run_layer(module, x: np.ndarray) -> np.ndarray:
    """A single layer's output for a NumPy input, without building a graph."""
    from minipeft.autograd import Tensor  # noqa: PLC0415

    with no_grad():
        return module(Tensor(x)).numpy()


def cli_runner(capsys):
    """``cli(*argv)``: run ``minipeft`` in-process with str()-ed arguments, assert exit 0 (showing stderr
    otherwise) and return what it printed on stdout."""
    from minipeft.cli import main  # noqa: PLC0415

    def cli(*argv) -> str:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    return cli


def logits(model, ids, **kwargs) -> np.ndarray:
    with no_grad():
        return model(ids, **kwargs).logits.numpy()


def printed(fn) -> str:
    """What ``fn()`` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn()
    return out.getvalue()


@contextlib.contextmanager
def frozen_dora_norms():
    """Hold every DoRA norm n at its first computed value: DoRA treats n as a constant in
    backprop (paper §4.3), so finite differences must too."""
    original, cache = dora.weight_norm, {}

    def held(layer, name):
        key = (id(layer), name)
        if key not in cache:
            cache[key] = original(layer, name)
        return cache[key]

    dora.weight_norm = held
    try:
        yield
    finally:
        dora.weight_norm = original


def assert_grads_match_fd(scalar_fn, params, rng=None, rtol=1e-5, atol=1e-8):
    """Backward of ``scalar_fn()`` (a scalar Tensor) against float64 central differences
    for every element of every parameter in ``params``. With ``rng`` its state is reset
    before every forward, so dropout masks are the same in every evaluation."""
    state = rng.bit_generator.state if rng is not None else None

    def run():
        if rng is not None:
            rng.bit_generator.state = state
        return scalar_fn()

    for p in params:
        p.grad = None
    run().backward()
    for i, p in enumerate(params):
        assert p.grad is not None, f"parameter {i} {p.shape} received no gradient"
        original = p.data

        def f(arrays, p=p):
            p.data = arrays[0]
            with no_grad():
                return run().item()

        numeric = numerical_gradient(f, [original], 0)
        p.data = original
        np.testing.assert_allclose(to_numpy(p.grad), numeric, rtol=rtol, atol=atol,
                                   err_msg=f"parameter {i} {p.shape}: backward != central differences")


def weighted_logits(model, ids, **kwargs):
    return weighted_sum(model(ids, **kwargs).logits)


# ----- oracles ---------------------------------------------------------------------------
def import_oracles():
    """(torch, transformers, peft), or skip with the reason."""
    torch = pytest.importorskip("torch", reason="torch not installed (the PEFT oracle tests need it)")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    peft = pytest.importorskip("peft", reason="peft not installed (Hugging Face PEFT is the oracle)")
    return torch, transformers, peft


def hf_checkpoint(folder, seed: int = 0, family: str = "llama", **overrides):
    """A tiny random LLaMA (or, ``family="qwen2"``, Qwen2) written by transformers itself (weights
    ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.2²), biases ~ N(0, 0.2²), so logits are far from uniform)."""
    torch, transformers, _ = import_oracles()
    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[family]
    config = getattr(transformers, names[0])(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, names[1])(config)
    randomize_hf_weights(model, torch)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def hf_model(folder):
    """transformers' model from ``folder`` in float32, eval mode."""
    torch, transformers, _ = import_oracles()
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), **{dtype_kw: torch.float32}).eval()


def hf_checkpoints(tmp_path_factory, models: dict) -> dict:
    """{name: folder}: one tiny transformers checkpoint per entry of ``models`` (name -> hf_checkpoint
    overrides), for a module-scoped fixture."""
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_checkpoint(root / name, **overrides) for name, overrides in models.items()}


def assert_logits_close(got, expected, rtol: float = 1e-5) -> None:
    """Same shape, and max |got - expected| within rtol of the logits' scale, max(1, max |expected|)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    diff = np.abs(got - expected).max()
    assert diff <= rtol * max(1.0, np.abs(expected).max()), diff


def ours(folder) -> mp.LlamaForCausalLM:
    """minipeft's model from an HF folder (the oracle tests' other side)."""
    return mp.LlamaForCausalLM.from_pretrained(folder)


def our_logits(model, ids, **kwargs) -> np.ndarray:
    with no_grad():
        return model(ids, **kwargs).logits.numpy()


def their_logits(model, ids, **kwargs) -> np.ndarray:
    """A torch model's logits for NumPy ids (kwargs passed as they are)."""
    torch, _, _ = import_oracles()
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.numpy()


def peft_randomize(model, seed: int = 5, scale: float = 0.3) -> None:
    """Add N(0, scale²) noise to every trainable parameter of a PEFT model (B ≠ 0 and the like)."""
    torch, _, _ = import_oracles()
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def assert_peft_loads_ours(peft_model, hf_folder, folder, rtol: float = 1e-5):
    """Save our ``peft_model`` to ``folder`` and load it in PEFT on the transformers model in ``hf_folder``:
    no missing / unexpected keys, and the same logits. Returns PEFT's model."""
    expected = our_logits(peft_model.eval(), token_ids())
    peft_model.save_pretrained(folder)
    theirs, complaints = load_in_peft(hf_folder, folder)
    assert not complaints, complaints
    assert_logits_close(their_logits(theirs, token_ids()), expected, rtol=rtol)
    return theirs


def assert_peft_saved_loads_here(theirs, hf_folder, folder, rtol: float = 1e-5):
    """Save PEFT's model ``theirs`` to ``folder`` and load it here on our model of ``hf_folder``: the
    same logits. Returns our PeftModel."""
    expected = their_logits(theirs.eval(), token_ids())
    theirs.save_pretrained(str(folder))
    loaded = mp.peft.PeftModel.from_pretrained(ours(hf_folder), folder)
    assert_logits_close(our_logits(loaded, token_ids()), expected, rtol=rtol)
    return loaded


def load_in_peft(hf_folder, adapter_folder):
    """(PEFT's model of ``adapter_folder`` on the transformers model in ``hf_folder``, the
    missing / unexpected-key warnings PEFT gave while loading it)."""
    _, _, peft = import_oracles()
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(hf_model(hf_folder), str(adapter_folder))
    return theirs, [str(w.message) for w in caught if any(s in str(w.message) for s in ("nexpected", "issing"))]
