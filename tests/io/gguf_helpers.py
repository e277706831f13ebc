"""Test-side GGUF files, written with ``gguf``'s own writer the way llama.cpp's
``convert_hf_to_gguf.py`` writes them, independently of ``minipeft.io.gguf``:
its name table, its q/k permutation, its metadata keys. The reader under test must
turn these back into the transformers folder they came from.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the 'gguf' package is not installed (pip install gguf)")

# transformers name piece -> llama.cpp name piece (gguf-py's tensor_mapping for LLAMA)
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK[module]}.{kind}"


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py, verbatim in NumPy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama3_rope_factors(config: dict) -> np.ndarray:
    """``rope_freqs.weight`` as llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors)
    computes it for a transformers config with llama3 rope scaling: its loop, in torch float32."""
    torch = pytest.importorskip("torch")
    scaling = config.get("rope_scaling") or config["rope_parameters"]
    base = config.get("rope_theta") or scaling["rope_theta"]
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low_freq_factor = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


def stored(values: np.ndarray, qtype) -> np.ndarray:
    """What a GGUF file of type ``qtype`` holds for a tensor (1-D tensors stay F32, as llama.cpp does)."""
    if values.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def roundtrip(values: np.ndarray, qtype) -> np.ndarray:
    """The float32 values a reader gets back for ``values`` stored as ``qtype``."""
    data = stored(values, qtype)
    if data.dtype != np.uint8:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, qtype).reshape(values.shape).astype(np.float32)


def read_folder(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file
    return (json.loads((folder / "config.json").read_text()),
            load_file(str(folder / "model.safetensors")))


def write_folder(folder: Path, like: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A copy of model folder ``like`` with other weights."""
    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (like / name).exists():
            shutil.copyfile(like / name, folder / name)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def convert(folder: Path, out: Path, qtype, arch: str = "llama", tokenizer: dict | None = None,
            extra_tensors: dict | None = None, skip_metadata: tuple = ()) -> Path:
    """Write HF model ``folder`` as GGUF the way convert_hf_to_gguf.py does (F32 vectors, ``qtype``
    matrices, llama's q/k permuted); ``tokenizer`` is extra key -> value metadata."""
    config, tensors = read_folder(folder)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    meta = {
        "block_count": config["num_hidden_layers"], "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"], "feed_forward_length": config["intermediate_size"],
        "attention.head_count": heads, "attention.head_count_kv": kv,
        "vocab_size": config["vocab_size"], "rope.dimension_count": config["hidden_size"] // heads,
    }
    for key, value in meta.items():
        if key not in skip_metadata:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", config["rope_theta"] if "rope_theta" in config
                  else config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    add_fields(w, tokenizer or {})
    for name, values in tensors.items():
        if arch != "llama":  # Qwen2Model has no permute: llama.cpp rotates its halves (NeoX RoPE)
            pass
        elif name.endswith("q_proj.weight"):
            values = permute(values, heads, heads)
        elif name.endswith("k_proj.weight"):
            values = permute(values, heads, kv)
        data = stored(values, qtype)
        w.add_tensor(llama_cpp_name(name), data, raw_dtype=qtype if values.ndim > 1
                     else gguf.GGMLQuantizationType.F32)
    for name, (data, raw) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def add_fields(w, fields: dict) -> None:
    """Metadata key -> value, typed as llama.cpp's converter types them (bool, uint32, string, array)."""
    for key, value in fields.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)


def tokenizer_only(out: Path, fields: dict, arch: str = "llama") -> Path:
    """A GGUF file with metadata only (enough for the tokenizer reader)."""
    w = gguf.GGUFWriter(str(out), arch)
    add_fields(w, fields)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
