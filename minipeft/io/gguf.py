"""GGUF in and out: llama.cpp's single-file model format, read and written with the ``gguf`` package.

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is a header of typed
key/value metadata (``general.architecture``, ``llama.block_count``, ``tokenizer.ggml.tokens``,
...) and a list of tensors, each stored as F32, F16, BF16 or a block quantisation (Q8_0,
Q4_0, Q4_1, the K-quants ...). ``gguf`` (maintained in llama.cpp's repository) parses the
file and dequantizes the blocks; this module adds what minipeft needs around it:

* names: llama.cpp's ``blk.N.attn_q.weight`` <-> transformers' ``model.layers.N.self_attn.q_proj.weight``
  (the map ``convert_hf_to_gguf.py`` applies, undone);
* RoPE row order (llama; a qwen2 file keeps transformers' order, as llama.cpp rotates its halves):
  llama.cpp rotates interleaved pairs (x[2j], x[2j+1]) while transformers
  rotates halves (x[j], x[j + Dh/2]). ``convert_hf_to_gguf.py`` therefore permutes the rows of
  ``q_proj`` and ``k_proj`` within each head: GGUF row ``2j + a`` holds HF row ``a*Dh/2 + j``.
  Reading undoes it (:func:`to_rotate_half`), writing applies it (:func:`to_interleaved`);
* the config: ``llama.*`` hyperparameters <-> a ``config.json``-style dict (``LlamaConfig.from_dict``
  validates it; this module does not import the model); Llama 3's RoPE scaling, which llama.cpp
  stores as the tensor ``rope_freqs.weight``, <-> transformers' ``rope_scaling``: :mod:`.gguf_rope`;
* the tokenizer fields (``tokenizer.ggml.*``): see :mod:`.gguf_tokenizer`; writing: :mod:`.gguf_writer`.

Every weight is returned as float32 (the compute dtype): a quantised model is loaded
dequantised, exactly as llama.cpp's own dequantisation gives it. Before anything is
allocated, every tensor's type, shape (against the metadata) and byte range (inside the file,
no overlaps) is checked, so a damaged header is an error, not a wrong or huge model.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError
from . import gguf_rope

# general.architecture -> config.json's model_type. llama.cpp runs Qwen2 with NeoX-style (rotate-half)
# RoPE, so its converter stores q/k rows in transformers' order: only llama's are permuted.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
_PERMUTED_MODEL_TYPES = ("llama", "mistral")
# Types whose dequantisation gguf implements and minipeft accepts. The IQ / TQ / MXFP4 types are
# refused by name: gguf's NumPy dequantisers for them are slow and untested here.
LOADABLE_TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                       "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_HF_BLOCK_NAMES = {hf: gg for gg, hf in _BLOCK_NAMES.items()}
_HF_GLOBAL_NAMES = {hf: gg for gg, hf in _GLOBAL_NAMES.items()}
_GGUF_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_NAME = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)")


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # a dependency in setup.cfg, but say what to do if it is missing
        raise CheckpointError("reading or writing GGUF needs the 'gguf' package: pip install gguf") from exc
    return gguf


# ----- names and row order --------------------------------------------------------------------
def hf_name(gguf_name: str) -> str | None:
    """transformers' name for a llama.cpp tensor name, or None if it is not a llama tensor."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    match = _GGUF_NAME.fullmatch(gguf_name)
    if match and match[2] in _BLOCK_NAMES:
        return f"model.layers.{int(match[1])}.{_BLOCK_NAMES[match[2]]}.{match[3]}"
    return None


def gguf_name(hf: str) -> str:
    """llama.cpp's name for a transformers tensor name (ConfigError if it has none)."""
    stem, _, kind = hf.rpartition(".")
    if stem in _HF_GLOBAL_NAMES:
        return f"{_HF_GLOBAL_NAMES[stem]}.{kind}"
    match = _HF_NAME.fullmatch(hf)
    if match and match[2] in _HF_BLOCK_NAMES:
        return f"blk.{int(match[1])}.{_HF_BLOCK_NAMES[match[2]]}.{match[3]}"
    raise ConfigError(f"tensor {hf!r} has no llama.cpp name (GGUF writing covers the llama tensors only)")


def to_interleaved(rows: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs, per head (``convert_hf_to_gguf`` permute)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def to_rotate_half(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`to_interleaved`: GGUF row ``2j + a`` -> HF row ``a*Dh/2 + j``."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rope_heads(hf: str, config: dict) -> int | None:
    """How many heads' rows to permute in tensor ``hf`` (None: not a q/k projection, or a model
    whose GGUF keeps transformers' row order)."""
    if config.get("model_type", "llama") not in _PERMUTED_MODEL_TYPES:
        return None
    if ".self_attn.q_proj." in hf:
        return config["num_attention_heads"]
    if ".self_attn.k_proj." in hf:
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


# ----- reading --------------------------------------------------------------------------------
def _reader_class(gguf, decode_arrays: bool):
    """A GGUFReader that reads metadata arrays with ``struct`` instead of gguf's NumPy views.

    gguf makes two NumPy views per string of ``tokenizer.ggml.tokens`` / ``merges`` (200k for a
    49k vocabulary): 2 of the 3 s a SmolLM2 model load took, and about 2 s of its tokenizer's.
    Here an array field keeps its key, types and length (``parts[4]``) but no parts; with
    ``decode_arrays`` its items are decoded straight into a Python list (``reader.arrays[key]``,
    what :func:`metadata_value` returns), else they are skipped (loading weights reads no array)."""
    kinds = gguf.GGUFValueType

    class FastArrayReader(gguf.GGUFReader):
        def __init__(self, path):
            self.arrays_at: dict = {}  # value offset -> list (or the error decoding it), during parsing
            super().__init__(path)
            self.arrays = {}
            for name, field in self.fields.items():
                if name.startswith("GGUF."):  # the header's own fields: no key bytes
                    continue
                value_at = field.offset + 8 + int(field.parts[0][0]) + 4  # after key length, key, type
                if value_at in self.arrays_at:
                    self.arrays[name] = self.arrays_at.pop(value_at)

        def _get_field_parts(self, orig_offs, raw_type):
            item = kinds(self._get(orig_offs, np.uint32)[0]) if kinds(raw_type) == kinds.ARRAY else None
            if item is None or (item != kinds.STRING and item not in self.gguf_scalar_to_np):
                return super()._get_field_parts(orig_offs, raw_type)
            raw_item, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            big = self.endianess != gguf.GGUFEndian.LITTLE
            raw, offs, n = memoryview(self.data), orig_offs + 12, int(count[0])
            if item == kinds.STRING:  # walk the lengths: struct on the raw bytes, no array per string
                length, strings = ">Q" if big else "<Q", []
                for _ in range(n):
                    size = struct.unpack_from(length, raw, offs)[0]
                    if decode_arrays:
                        strings.append(raw[offs + 8:offs + 8 + size])
                    offs += 8 + size
                if offs > len(self.data):
                    raise ValueError(f"a metadata array runs past the end of the file (byte {offs})")
                if decode_arrays:
                    try:
                        self.arrays_at[orig_offs] = [str(piece, encoding="utf-8") for piece in strings]
                    except UnicodeDecodeError as exc:  # reported when the key is asked for, as gguf would
                        self.arrays_at[orig_offs] = exc
            else:
                dtype = np.dtype(self.gguf_scalar_to_np[item]).newbyteorder(">" if big else "<")
                offs += n * dtype.itemsize
                if offs > len(self.data):
                    raise ValueError(f"a metadata array runs past the end of the file (byte {offs})")
                if decode_arrays:
                    self.arrays_at[orig_offs] = np.frombuffer(raw[orig_offs + 12:offs], dtype).tolist()
            return offs - orig_offs, [raw_item, count], [], [kinds.ARRAY, item]

    return FastArrayReader


def open_gguf(path, arrays: bool = True):
    """A ``gguf.GGUFReader`` on ``path``; any parse failure becomes a CheckpointError naming the file.
    Metadata arrays (the tokenizer's) are decoded fast (see above); ``arrays=False`` skips them."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return _reader_class(gguf, decode_arrays=arrays)(path)
    except (OSError, MemoryError) as exc:
        raise CheckpointError(f"{path}: cannot read GGUF file: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, KeyError, IndexError ... on bad bytes
        raise CheckpointError(f"{path}: not a valid GGUF file ({type(exc).__name__}: {exc})") from None


def metadata_value(reader, key: str, path, default=None):
    """The value of metadata ``key`` (str, int, float, bool or list), or ``default``."""
    field = reader.fields.get(key)
    if field is None:
        return default
    decoded = getattr(reader, "arrays", {}).get(key)  # an array open_gguf decoded
    if isinstance(decoded, Exception):
        raise CheckpointError(f"{path}: metadata {key!r} is unreadable ({decoded})")
    if decoded is not None:
        return decoded
    try:
        return field.contents()
    except Exception as exc:  # noqa: BLE001 - malformed strings / arrays
        raise CheckpointError(f"{path}: metadata {key!r} is unreadable ({exc})") from None


def _number(value, key: str, path, kind=int):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok:
        raise CheckpointError(f"{path}: metadata {key!r} must be a{'n integer' if kind is int else ' number'}, "
                              f"got {value!r}")
    if kind is float:
        # GGUF stores float32: 1e-5 comes back as 9.99999974e-06. Take the shortest decimal that
        # rounds to the same float32, which is what the converter was given.
        return float(str(np.float32(value)))
    return value


def gguf_config(reader, path) -> dict:
    """A transformers ``config.json``-style dict from the GGUF metadata (validated later by LlamaConfig)."""
    arch = metadata_value(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; minipeft loads "
                              f"{', '.join(map(repr, SUPPORTED_ARCHITECTURES))} GGUF files only")
    names = {t.name for t in reader.tensors}

    def get(key, kind=int, default=None):
        value = metadata_value(reader, f"{arch}.{key}", path)
        if value is None:
            if default is None:
                raise CheckpointError(f"{path}: metadata '{arch}.{key}' is missing")
            return default
        return _number(value, f"{arch}.{key}", path, kind)

    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", default=heads)
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", default=hidden // max(heads, 1))
    if get("attention.value_length", default=head_dim) != head_dim:
        raise CheckpointError(f"{path}: '{arch}.attention.value_length' differs from key_length; "
                              "minipeft needs equal key and value head sizes")
    if get("rope.dimension_count", default=head_dim) != head_dim:
        raise CheckpointError(f"{path}: '{arch}.rope.dimension_count' is not the head size {head_dim}; "
                              "partial rotary embeddings are not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")  # counted, not decoded: 100k strings are slow
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    # parts: key length, key, value type, item type, item count, items (none when skipped)
    default_vocab = int(tokens.parts[4][0]) if tokens is not None else (int(embed.shape[-1]) if embed is not None else 0)
    config = {
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": get("vocab_size", default=default_vocab or None),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", default=2048),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float),
        "rope_theta": get("rope.freq_base", float, default=10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        # qwen2: q/k/v biases always (the model type says so), none on o_proj
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "hidden_act": "silu",
    }
    scaling = metadata_value(reader, f"{arch}.rope.scaling.type", path, "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": get("rope.scaling.factor", float)}
    elif scaling != "none":
        raise CheckpointError(f"{path}: '{arch}.rope.scaling.type' is {scaling!r}; minipeft reads "
                              "'none' and 'linear' from GGUF")
    factors = next((t for t in reader.tensors if t.name == gguf_rope.TENSOR_NAME), None)
    if factors is not None:  # Llama 3.1 / 3.2: per-frequency divisors (gguf_rope.py)
        if arch != "llama":
            raise CheckpointError(f"{path}: tensor {gguf_rope.TENSOR_NAME!r} in a {arch!r} file: llama.cpp "
                                  "applies these RoPE factors to llama-architecture files only")
        if scaling != "none":
            raise CheckpointError(f"{path}: both '{arch}.rope.scaling.type' and tensor "
                                  f"{gguf_rope.TENSOR_NAME!r} scale RoPE; minipeft reads one or the other")
        if factors.tensor_type.name != "F32":
            raise CheckpointError(f"{path}: tensor {gguf_rope.TENSOR_NAME!r} is stored as "
                                  f"{factors.tensor_type.name}; llama.cpp writes it as F32")
        rope_scaling = gguf_rope.llama3_scaling(np.asarray(factors.data), config["rope_theta"], head_dim, path)
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        value = metadata_value(reader, f"tokenizer.ggml.{key}", path)
        config[f"{role}_token_id"] = None if value is None else _number(value, f"tokenizer.ggml.{key}", path)
    return config


def _dequantized(tensor, path) -> np.ndarray:
    """One tensor as float32 in (out, in) order (GGUF lists dimensions innermost first)."""
    gguf = _gguf()
    kind = tensor.tensor_type.name
    if kind not in LOADABLE_TYPE_NAMES:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} is stored as {kind}; minipeft loads "
                              f"{', '.join(LOADABLE_TYPE_NAMES)}")
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        data = np.asarray(tensor.data)
        if kind in ("F32", "F16"):
            values = data.astype(np.float32)
        else:
            values = gguf.quants.dequantize(data, tensor.tensor_type)
        return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)
    except (ValueError, TypeError, AssertionError) as exc:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} ({kind}, shape {shape}) does not hold "
                              f"its data: {exc}") from None


def read_gguf(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config dict, {hf_name: float32 array})`` of a llama or qwen2 GGUF file, q/k rows in HF order."""
    path = Path(path)
    reader = open_gguf(path, arrays=False)  # the weights need no metadata array
    config = gguf_config(reader, path)
    blocks = config["num_hidden_layers"]
    if not isinstance(blocks, int) or not 0 < blocks <= len(reader.tensors) // len(_BLOCK_NAMES):
        arch = metadata_value(reader, "general.architecture", path)
        raise CheckpointError(f"{path}: '{arch}.block_count' is {blocks!r}, but the file holds "
                              f"{len(reader.tensors)} tensors ({len(_BLOCK_NAMES)} per block)")
    expected = expected_shapes(config)
    names = {}
    for tensor in reader.tensors:  # every type and shape checked before anything is allocated
        if tensor.name == gguf_rope.TENSOR_NAME:  # read into the config above, not a weight
            continue
        if tensor.tensor_type.name not in LOADABLE_TYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}; "
                                  f"minipeft loads {', '.join(LOADABLE_TYPE_NAMES)}")
        name = hf_name(tensor.name)
        if name is None or name not in expected:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} is not a llama tensor minipeft knows "
                                  f"(for a model of {config['num_hidden_layers']} blocks)")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} has shape {shape}, but the metadata "
                                  f"implies {expected[name]}")
        names[tensor.name] = name
    end = 0  # tensor data must neither overlap nor run past the file (gguf does not check)
    for tensor in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        if int(tensor.data_offset) < end or int(tensor.data_offset) + int(tensor.n_bytes) > len(reader.data):
            raise CheckpointError(f"{path}: the data of tensor {tensor.name!r} overlaps another tensor's "
                                  "or runs past the end of the file")
        end = int(tensor.data_offset) + int(tensor.n_bytes)
    found = set(names.values())
    missing = [n for n in expected if n not in found
               and not (n == "lm_head.weight" and config["tie_word_embeddings"])]
    if missing:
        raise CheckpointError(f"{path}: tensor {gguf_name(missing[0])!r} is missing "
                              f"({len(missing)} missing in all)")
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name not in names:
            continue
        name = names[tensor.name]
        values = _dequantized(tensor, path)
        heads = _rope_heads(name, config)
        if heads is not None:
            if values.shape[0] % (2 * heads):
                raise CheckpointError(f"{path}: tensor {tensor.name!r} has {values.shape[0]} rows, "
                                      f"not a whole number of {heads} heads of even size")
            values = to_rotate_half(values, heads)
        tensors[name] = values
    return config, tensors


def expected_shapes(config: dict) -> dict[str, tuple]:
    """{hf name: shape} of every tensor a llama / qwen2 model of ``config`` has (biases as the config
    and the model type say)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    block = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
             "self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
             "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
             "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    for layer in range(config["num_hidden_layers"]):
        for module, shape in block.items():
            shapes[f"model.layers.{layer}.{module}.weight"] = shape
            if "norm" in module:
                continue
            qwen2_qkv = config.get("model_type") == "qwen2" and module != "self_attn.o_proj"
            if ((config["attention_bias"] or qwen2_qkv) and "self_attn" in module) or (config["mlp_bias"] and "mlp" in module):
                shapes[f"model.layers.{layer}.{module}.bias"] = shape[:1]
    return shapes
