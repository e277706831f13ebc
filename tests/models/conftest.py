"""Shared fixtures for the model tests: tiny random models (ours, and checkpoints
written by transformers itself), the bundled model, and the device parameter.

Nothing here imports torch at module level, so the tests that need no oracle run
without it; the oracle fixtures skip with the true reason when it is missing.
"""
from __future__ import annotations

import numpy as np
import pytest

import minipeft as mp
from tests.helpers.hf import randomize_hf_weights
from minipeft.backend import gpu_available

# A tiny LLaMA: 4 query heads over 2 key/value heads (GQA), head_dim 8.
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Every test taking ``device`` runs on NumPy and, where CuPy sees a GPU, on CuPy."""
    if request.param == "cuda" and not gpu_available():
        pytest.skip("no CUDA GPU with CuPy on this machine")
    return request.param


def _random_model(seed: int = 0, **overrides) -> mp.LlamaForCausalLM:
    """A minipeft model with random weights (no file, no transformers) from ``TINY``."""
    config = mp.LlamaConfig(**{**TINY, **overrides})
    return mp.LlamaForCausalLM(config, rng=np.random.default_rng(seed))


@pytest.fixture(scope="session")
def bundled():
    """The bundled stories260K model and its tokenizer (loaded once; tests must not modify it)."""
    path = mp.bundled_model_path()
    return mp.LlamaForCausalLM.from_pretrained(path), mp.Tokenizer.from_pretrained(path)


# ----- oracles ------------------------------------------------------------------------
def _import_oracles():
    """(torch, transformers), or skip the test with the reason they are unavailable."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    return torch, transformers


def _dtype_kwarg(transformers) -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; older versions ignore ``dtype``."""
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _hf_load_float32(folder):
    """transformers' model from ``folder``, computing in float32 whatever the stored dtype."""
    torch, transformers = _import_oracles()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), **{_dtype_kwarg(transformers): torch.float32})
    return model.eval()


def _hf_checkpoint(folder, family: str = "llama", dtype: str = "float32", seed: int = 0, **overrides):
    """Write a tiny random checkpoint with transformers itself into ``folder``; return the folder.

    transformers initialises biases to zero, norms to one and weights with std 0.02,
    which would leave those paths untested and the logits nearly uniform; so every
    weight is redrawn ~ N(0, 1/fan_in), every bias ~ N(0, 0.2²) and every norm
    ~ 1 + N(0, 0.2²), giving logits of magnitude ~4.
    """
    torch, transformers = _import_oracles()
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[family]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    randomize_hf_weights(model, torch)
    model.to(getattr(torch, dtype))
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


# Helpers reach the test modules as (session-scoped, stateless) fixtures, since test
# files cannot import this conftest under pytest's importlib import mode.
@pytest.fixture(scope="session")
def random_model():
    """``random_model(seed=0, **config_overrides)``: a random minipeft model from ``TINY``."""
    return _random_model


@pytest.fixture(scope="session")
def oracles():
    """(torch, transformers), or a skip naming the one that is not installed."""
    return _import_oracles()


@pytest.fixture(scope="session")
def hf_checkpoint(oracles):
    """``hf_checkpoint(folder, family="llama", dtype="float32", seed=0, **config_overrides)``."""
    return _hf_checkpoint


@pytest.fixture(scope="session")
def hf_load_float32(oracles):
    """``hf_load_float32(folder)``: transformers' model of a folder, computing in float32."""
    return _hf_load_float32
