"""The model against Hugging Face transformers on the same checkpoints.

Every checkpoint here is written by transformers itself (``save_pretrained``) from a
tiny random model, in F32, F16 or BF16; minipeft loads it and must give the same
logits, loss and parameter gradients as transformers computing in float32 on the
same folder. The variants cover each architecture switch minipeft reads from
config.json. The bundled (really trained) model is compared too, and folders that
minipeft saves must load in transformers with the same logits.
"""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

import minipeft as mp
from minipeft.backend import gpu_available, to_numpy

LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4  # relative to the largest |gradient| of that parameter

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

# (id, family, stored dtype, config overrides, sequence length)
CASES = [
    ("gqa", "llama", "float32", {}, 24),
    ("no-gqa-tied", "llama", "float32", {"num_key_value_heads": 4, "tie_word_embeddings": True}, 24),
    ("untied", "llama", "float32", {"tie_word_embeddings": False}, 24),
    ("attention-bias", "llama", "float32", {"attention_bias": True}, 24),
    ("mlp-bias", "llama", "float32", {"mlp_bias": True}, 24),
    ("qwen2", "qwen2", "float32", {"tie_word_embeddings": False}, 24),
    ("qwen2-tied", "qwen2", "float32", {"tie_word_embeddings": True, "num_key_value_heads": 1}, 24),
    # sequences longer than original_max_position_embeddings, so the scaling matters
    ("llama3-rope", "llama", "float32", {"rope_scaling": LLAMA3}, 40),
    # head_dim 16 with original length 32: the high, the blended and the low band all occur
    ("llama3-rope-all-bands", "llama", "float32",
     {"hidden_size": 64, "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 32}}, 40),
    ("linear-rope", "llama", "float32", {"rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                         "rope_theta": 500.0}, 40),
    ("explicit-head-dim", "llama", "float32", {"head_dim": 12}, 24),
    ("f16", "llama", "float16", {"attention_bias": True, "tie_word_embeddings": True}, 24),
    ("bf16", "llama", "bfloat16", {"mlp_bias": True}, 24),
    ("bf16-qwen2", "qwen2", "bfloat16", {"head_dim": 12}, 24),
]


def batch(vocab_size: int, length: int, seed: int = 0):
    """Random ids (2, length) and labels with some positions ignored (−100)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (2, length))
    labels = ids.copy()
    labels[0, :5] = -100
    labels[1, rng.choice(length, size=4, replace=False)] = -100
    return ids, labels


def compare_with_transformers(hf_load_float32, folder, ids, labels, device="cpu"):
    """Assert equal logits, loss and every parameter's gradient (ours vs transformers)."""
    import torch  # noqa: PLC0415 - only reached once the oracles fixture imported it

    ref = hf_load_float32(folder)
    ours = mp.LlamaForCausalLM.from_pretrained(folder, device=device)

    out = ours(ids, labels=labels)
    out.loss.backward()
    ref_out = ref(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    ref_out.loss.backward()

    ref_logits = ref_out.logits.detach().numpy()
    assert np.abs(ref_logits).max() > 1.0, "logits are nearly uniform: the test would prove little"
    np.testing.assert_allclose(out.logits.numpy(), ref_logits, rtol=0, atol=LOGITS_ATOL)
    assert abs(out.loss.item() - ref_out.loss.item()) <= LOSS_ATOL

    # Names match 1:1. A tied head is one parameter on both sides (named after the
    # embedding), so its gradient holds the embedding's and the head's contributions.
    ref_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    our_grads = {n: to_numpy(p.grad) for n, p in ours.named_parameters()}
    assert sorted(our_grads) == sorted(ref_grads)
    for name, g_ref in ref_grads.items():
        scale = np.abs(g_ref).max()
        assert scale > 0, name
        err = np.abs(our_grads[name] - g_ref).max() / scale
        assert err <= GRAD_RTOL, f"{name}: gradient differs by {err:.2e} of its max"
    return ours, ref


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_logits_loss_and_grads_as_transformers(tmp_path, hf_checkpoint, hf_load_float32, case):
    _, family, dtype, overrides, length = case
    folder = hf_checkpoint(tmp_path, family=family, dtype=dtype, seed=CASES.index(case), **overrides)
    ours, _ = compare_with_transformers(hf_load_float32, folder, *batch(96, length))
    # the stored dtype really was the one asked for, and the switch really was read
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored.get("dtype", stored.get("torch_dtype")) == dtype
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings", "head_dim"):
        if key in overrides:
            assert getattr(ours.config, key) == overrides[key]
    if "rope_scaling" in overrides:
        assert ours.config.rope_type == overrides["rope_scaling"]["rope_type"]


def test_bias_layout_of_each_family(tmp_path, hf_checkpoint):
    """llama's attention_bias puts biases on q, k, v and o; qwen2 always on q, k, v only."""
    llama = mp.LlamaForCausalLM.from_pretrained(
        hf_checkpoint(tmp_path / "llama", attention_bias=True, mlp_bias=True))
    qwen = mp.LlamaForCausalLM.from_pretrained(hf_checkpoint(tmp_path / "qwen", family="qwen2"))
    llama_biases = {n for n, _ in llama.named_parameters() if n.endswith("bias")}
    qwen_biases = {n for n, _ in qwen.named_parameters() if n.endswith("bias")}
    assert {n.split(".")[-2] for n in llama_biases} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"}
    assert {n.split(".")[-2] for n in qwen_biases} == {"q_proj", "k_proj", "v_proj"}


@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU with CuPy on this machine")
def test_cupy_backend_matches_transformers(tmp_path, hf_checkpoint, hf_load_float32):
    """The CuPy backend against the same oracle (every other test here runs on NumPy)."""
    folder = hf_checkpoint(tmp_path, attention_bias=True, rope_scaling=LLAMA3)
    compare_with_transformers(hf_load_float32, folder, *batch(96, 40), device="cuda")


@pytest.mark.parametrize("family,overrides", [("llama", {"attention_bias": True}),
                                              ("qwen2", {"rope_scaling": LLAMA3})])
def test_left_padding_matches_transformers(tmp_path, hf_checkpoint, hf_load_float32, oracles,
                                           family, overrides):
    """With left padding, the logits of real positions equal transformers' given the same
    attention_mask and position_ids (positions counting real tokens only)."""
    torch, _ = oracles
    folder = hf_checkpoint(tmp_path, family=family, **overrides)
    ours, ref = mp.LlamaForCausalLM.from_pretrained(folder), hf_load_float32(folder)
    rng = np.random.default_rng(1)
    length, pads = 24, np.array([0, 7, 3])
    ids = rng.integers(0, 96, (3, length))
    mask = (np.arange(length)[None, :] >= pads[:, None]).astype(np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ids = np.where(mask == 1, ids, 0)

    logits = ours(ids, attention_mask=mask, position_ids=positions).logits.numpy()
    with torch.no_grad():
        ref_logits = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         position_ids=torch.from_numpy(positions)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref_logits[real], rtol=0, atol=LOGITS_ATOL)
    # and a padded row's real positions equal that row run alone, unpadded
    alone = ours(ids[1:2, pads[1]:]).logits.numpy()
    np.testing.assert_allclose(logits[1, pads[1]:], alone[0], rtol=0, atol=LOGITS_ATOL)


def test_bundled_model_matches_transformers(hf_load_float32):
    ids, labels = batch(512, 24, seed=3)
    ids[:, 0] = 1  # BOS, as the model was trained
    compare_with_transformers(hf_load_float32, mp.bundled_model_path(), ids, labels)


# ----- folders minipeft saves load in transformers -------------------------------------
@pytest.mark.parametrize("dtype,max_shard_bytes", [(None, None), (ml_dtypes.bfloat16, None),
                                                   (np.float16, None), (None, 20_000)],
                         ids=["f32", "bf16", "f16", "sharded"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_loads_what_we_save(tmp_path, hf_checkpoint, hf_load_float32, oracles,
                                         dtype, max_shard_bytes, tied):
    torch, transformers = oracles
    source = hf_checkpoint(tmp_path / "source", tie_word_embeddings=tied, attention_bias=not tied,
                           rope_scaling=LLAMA3)
    model = mp.LlamaForCausalLM.from_pretrained(source)
    out = tmp_path / "saved"
    model.save_pretrained(out, dtype=dtype, max_shard_bytes=max_shard_bytes)

    files = sorted(p.name for p in out.iterdir())
    if max_shard_bytes is None:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:
        assert "model.safetensors.index.json" in files
        assert len([f for f in files if f.startswith("model-")]) > 1
    config = json.loads((out / "config.json").read_text())
    name = np.dtype(dtype or np.float32).name
    # both spellings transformers has used name the dtype actually stored
    assert config["dtype"] == config["torch_dtype"] == name

    ids = np.random.default_rng(2).integers(0, 96, (2, 30))
    # transformers with its own defaults (the stored dtype)...
    default = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert default.dtype == getattr(torch, name)
    # ... and in float32 equals our model reloaded from the same (possibly rounded) weights
    ref = hf_load_float32(out)
    reloaded = mp.LlamaForCausalLM.from_pretrained(out)
    with torch.no_grad():
        ref_logits = ref(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(reloaded(ids).logits.numpy(), ref_logits, rtol=0, atol=LOGITS_ATOL)
    if dtype is None:  # float32 is lossless: the same logits as before saving
        np.testing.assert_allclose(model(ids).logits.numpy(), ref_logits, rtol=0, atol=LOGITS_ATOL)
    else:  # only rounding of the weights separates them
        before = dict(model.named_parameters())
        for key, p in reloaded.named_parameters():
            np.testing.assert_array_equal(p.data, before[key].data.astype(dtype).astype(np.float32))


def test_saved_dtype_overrides_the_loaded_one(tmp_path, hf_checkpoint, oracles):
    """A BF16 checkpoint saved back as F32 must not keep the stale ``"dtype": "bfloat16"``:
    transformers would then compute in bfloat16 and give other logits."""
    torch, transformers = oracles
    model = mp.LlamaForCausalLM.from_pretrained(hf_checkpoint(tmp_path / "bf16", dtype="bfloat16"))
    model.save_pretrained(tmp_path / "f32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32")).eval()
    assert ref.dtype == torch.float32
    ids = np.arange(20).reshape(1, 20)
    with torch.no_grad():
        ref_logits = ref(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model(ids).logits.numpy(), ref_logits, rtol=0, atol=LOGITS_ATOL)
