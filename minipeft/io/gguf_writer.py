"""Writing GGUF: a model's state dict and config as a llama- (or qwen2-) architecture file llama.cpp reads.

What ``convert_hf_to_gguf.py`` does for a Llama or Qwen2 checkpoint, from minipeft's own tensors:
llama.cpp names (:func:`.gguf.gguf_name`), a llama's q/k rows permuted to the interleaved RoPE
order (:func:`.gguf.to_interleaved`; Qwen2's stay as they are: llama.cpp rotates its halves), the
``llama.*`` / ``qwen2.*`` hyperparameters, Llama 3's ``rope_freqs.weight`` (:mod:`.gguf_rope`),
``general.file_type``, and the tokenizer metadata (:mod:`.gguf_tokenizer`). Types: F32, F16, BF16
and the simple block types gguf can quantise (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). As in the converter,
vectors (norms, biases) stay F32 and a matrix whose rows are not a whole number of blocks falls back
to F16. The file appears atomically (written next to its place, then renamed).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .gguf import _gguf, _rope_heads, gguf_name, to_interleaved
from .gguf_rope import TENSOR_NAME as ROPE_FACTORS
from .gguf_rope import llama3_divisors

# config.json's model_type -> the GGUF architecture written: llama.cpp runs Mistral as llama.
WRITABLE_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
WRITABLE_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# llama.cpp's ``general.file_type`` (enum llama_ftype) for each type written.
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}
_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the block layout llama.cpp reads today


def _add_value(writer, key: str, value) -> None:
    """Metadata with the GGUF type llama.cpp expects for a Python value."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if not value:
            return  # gguf cannot type an empty array; llama.cpp treats a missing one as empty
        writer.add_array(key, list(value))
    else:
        raise ConfigError(f"GGUF metadata {key!r}: cannot store a {type(value).__name__}")


def _encode(values: np.ndarray, kind: str, gguf):
    """``(stored array, GGML type)`` for one tensor in the requested type, with llama.cpp's fallbacks."""
    qtype = gguf.GGMLQuantizationType
    if values.ndim == 1 or kind == "f32":
        return values.astype(np.float32), qtype.F32
    if kind == "f16":
        return values.astype(np.float16), qtype.F16
    target = getattr(qtype, kind.upper())
    try:
        return gguf.quants.quantize(values.astype(np.float32), target), target
    except gguf.quants.QuantError:  # rows not a whole number of blocks: convert_hf_to_gguf uses F16
        return values.astype(np.float16), qtype.F16


def write_gguf(path, config: dict, tensors: dict[str, np.ndarray], gguf_type: str = "f16",
               tokenizer_fields: dict | None = None, name: str | None = None) -> dict[str, str]:
    """Write a llama- or qwen2-architecture GGUF that llama.cpp reads; returns {gguf tensor name: type written}.

    ``config`` is a ``config.json``-style dict (``model.config.to_dict()``), ``tensors`` the
    model's state dict in HF names and order, ``tokenizer_fields`` the ``tokenizer.*`` metadata
    (:func:`.gguf_tokenizer.tokenizer_fields_from_folder`). The file appears atomically.
    """
    gguf = _gguf()
    path = Path(path)
    kind = gguf_type.lower()
    if kind not in WRITABLE_TYPE_NAMES:
        raise ConfigError(f"GGUF type {gguf_type!r} is not supported; choose one of {', '.join(WRITABLE_TYPE_NAMES)}")
    model_type = config.get("model_type", "llama")
    if model_type not in WRITABLE_MODEL_TYPES:
        raise ConfigError(f"config model_type {model_type!r}: minipeft writes GGUF for "
                          f"{', '.join(WRITABLE_MODEL_TYPES)} models only")
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(f"config rope_scaling type {rope_type!r} cannot be written to GGUF by minipeft "
                          "(supported: default, linear, llama3)")
    arch = WRITABLE_MODEL_TYPES[model_type]
    if rope_type == "llama3" and arch != "llama":  # llama.cpp's qwen2 graph reads no rope_freqs
        raise ConfigError(f"config rope_scaling type 'llama3' cannot be written for a {model_type} model: "
                          "llama.cpp applies it to llama-architecture files only")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or "minipeft model")
    writer.add_file_type(_FILE_TYPE[kind])
    if kind not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(_QUANTIZATION_VERSION)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if rope_type == "llama3":  # as llama.cpp's converter: one divisor per frequency (gguf_rope.py)
        divisors = llama3_divisors(float(config.get("rope_theta", 10000.0)), head_dim, scaling)
        writer.add_tensor(ROPE_FACTORS, divisors, raw_dtype=gguf.GGMLQuantizationType.F32)
    for key, value in (tokenizer_fields or {}).items():
        _add_value(writer, key, value)

    written = {}
    tied = config.get("tie_word_embeddings", False)
    for hf, values in tensors.items():
        if tied and hf == "lm_head.weight":
            continue  # llama.cpp uses token_embd when output.weight is absent
        values = np.asarray(values, dtype=np.float32)
        rope_heads = _rope_heads(hf, config)
        if rope_heads is not None:
            values = to_interleaved(values, rope_heads)
        stored, ggml_type = _encode(values, kind, gguf)
        target = gguf_name(hf)
        writer.add_tensor(target, stored, raw_dtype=ggml_type)
        written[target] = ggml_type.name

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return written
