"""Zero-copy loading: float32 weights are views of a copy-on-write memory map of the file.

What must hold (the loader's docstrings promise it): a loaded model's float32 parameters
share memory with the mapping (no copy at load, in ``to()`` or ``load_state_dict``);
F16 / BF16 weights are converted once; writing a parameter in place, as an optimizer or
a LoRA merge does, changes the process's copy of that page only, never the file; and
merge / unmerge, training and saving give exactly what a model holding ordinary arrays
gives (equal bytes), also when saving over the very folder the model was mapped from.
Also: a GGUF model load skips the tokenizer's metadata arrays (most of its time), and that
reader agrees with gguf's on every other field.
"""
from __future__ import annotations

import hashlib
import mmap
import os

import gguf
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minipeft as mp
from minipeft.io.gguf import open_gguf
from minipeft.io.safetensors import read_safetensors, write_safetensors
from minipeft.train import AdamW
from tests.io.gguf_helpers import tokenizer_only
from tests.peft.helpers import tiny_model, token_ids


# Windows reads files instead of mapping them (it cannot replace a mapped file)
maps_files = pytest.mark.skipif(os.name == "nt", reason="read_safetensors maps files everywhere but Windows")


def mapping_of(array: np.ndarray):
    """The mmap an array is a view of (following .base, then memoryview.obj), or None."""
    base = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return base
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return None


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def saved(tmp_path, seed=0, dtype=None, name="model"):
    folder = tmp_path / name
    tiny_model(seed).save_pretrained(folder, dtype=dtype)
    return folder


def all_weights(model) -> dict[str, np.ndarray]:
    return {name: np.array(p.data) for name, p in model.named_parameters()}


@maps_files
def test_read_safetensors_maps_the_file_and_writes_never_reach_it(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.arange(3)})
    before = digest(path)
    tensors = read_safetensors(path)
    assert all(mapping_of(a) is not None for a in tensors.values())
    assert mapping_of(tensors["w"]) is mapping_of(tensors["i"])  # one mapping per file
    assert tensors["w"].flags.writeable
    tensors["w"][0, 0] = 42.0
    tensors["w"] *= 2
    assert digest(path) == before
    np.testing.assert_array_equal(read_safetensors(path)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    # the buffered reader gives the same arrays, owned by no mapping
    buffered = read_safetensors(path, mmap=False)
    assert mapping_of(buffered["w"]) is None
    np.testing.assert_array_equal(buffered["i"], np.arange(3))


@maps_files
def test_float32_folder_loads_without_copying_any_weight(tmp_path):
    folder = saved(tmp_path)
    model = mp.LlamaForCausalLM.from_pretrained(folder)
    params = dict(model.named_parameters())
    maps = {id(mapping_of(p.data)) for p in params.values()}
    assert None not in {mapping_of(p.data) for p in params.values()}
    assert len(maps) == 1  # every parameter is a view of the one mapped file
    original = dict(tiny_model(0).named_parameters())
    for name, p in params.items():
        np.testing.assert_array_equal(p.data, original[name].data)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_folder_is_converted_once_to_float32(tmp_path, dtype):
    folder = saved(tmp_path, dtype=dtype)
    stored = read_safetensors(folder / "model.safetensors")
    model = mp.LlamaForCausalLM.from_pretrained(folder)
    for name, p in model.named_parameters():
        assert p.data.dtype == np.float32 and mapping_of(p.data) is None
        np.testing.assert_array_equal(p.data, stored[name].astype(np.float32))


def test_to_and_load_state_dict_keep_arrays_of_the_right_dtype(tmp_path):
    model = tiny_model(0)
    before = {name: p.data for name, p in model.named_parameters()}
    model.to(dtype=np.float32)
    assert all(p.data is before[name] for name, p in model.named_parameters())
    model.to(device="cpu", dtype=np.float32)
    assert all(p.data is before[name] for name, p in model.named_parameters())
    model.to(dtype=np.float64)  # a real conversion still converts
    assert all(p.data.dtype == np.float64 and not np.shares_memory(p.data, before[name])
               for name, p in model.named_parameters())

    target = tiny_model(1)
    state = tiny_model(0).state_dict()
    target.load_state_dict(state)
    assert all(np.shares_memory(p.data, state[name]) for name, p in target.named_parameters())
    target.load_state_dict({k: v.astype(np.float64) for k, v in state.items()})
    assert all(p.data.dtype == np.float32 for p in target.parameters())


def test_writing_loaded_parameters_never_changes_the_file(tmp_path):
    folder = saved(tmp_path)
    before = digest(folder / "model.safetensors")
    model = mp.LlamaForCausalLM.from_pretrained(folder)
    for p in model.parameters():
        p.data += 1.0
        p.data[...] = -p.data
    assert digest(folder / "model.safetensors") == before
    fresh = mp.LlamaForCausalLM.from_pretrained(folder)
    np.testing.assert_array_equal(fresh.model.norm.weight.data, tiny_model(0).model.norm.weight.data)


def test_merge_unmerge_on_a_mapped_model_equals_an_in_memory_model_and_saves_its_bytes(tmp_path):
    folder = saved(tmp_path)
    before = digest(folder / "model.safetensors")
    config = mp.peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                init_lora_weights=False)
    mapped = mp.peft.get_peft_model(mp.LlamaForCausalLM.from_pretrained(folder), config)
    plain = mp.peft.get_peft_model(tiny_model(0), config)
    plain.load_state_dict(mapped.state_dict())  # same adapter weights (random, B != 0)
    ids = token_ids()
    with mp.no_grad():
        expected = plain(ids).logits.data
        mapped.merge_adapter()
        plain.merge_adapter()
        np.testing.assert_allclose(mapped(ids).logits.data, expected, rtol=1e-5, atol=1e-5)
        mapped.unmerge_adapter()
        np.testing.assert_allclose(mapped(ids).logits.data, expected, rtol=1e-5, atol=1e-5)
    assert digest(folder / "model.safetensors") == before

    merged = mp.peft.get_peft_model(mp.LlamaForCausalLM.from_pretrained(folder), config)
    merged.load_state_dict(plain.state_dict())
    merged = merged.merge_and_unload()
    reference = mp.peft.get_peft_model(tiny_model(0), config)
    reference.load_state_dict(plain.state_dict())
    reference = reference.merge_and_unload()
    # save over the folder the merged model is still mapped from: the file is replaced by a
    # rename, the old mapping stays valid, and the new file holds the merged weights
    merged.save_pretrained(folder)
    assert digest(folder / "model.safetensors") != before
    reference.save_pretrained(tmp_path / "reference")
    assert digest(folder / "model.safetensors") == digest(tmp_path / "reference" / "model.safetensors")
    again = mp.LlamaForCausalLM.from_pretrained(folder)
    for name, p in again.named_parameters():
        np.testing.assert_array_equal(p.data, dict(reference.named_parameters())[name].data)


def test_training_a_mapped_model_equals_training_an_in_memory_one(tmp_path):
    folder = saved(tmp_path)
    before = digest(folder / "model.safetensors")
    mapped = mp.LlamaForCausalLM.from_pretrained(folder)
    plain = tiny_model(0)
    ids = token_ids()
    for model in (mapped, plain):
        optimizer = AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            model.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
    assert digest(folder / "model.safetensors") == before
    trained = all_weights(plain)
    for name, value in all_weights(mapped).items():
        np.testing.assert_array_equal(value, trained[name])
    assert any(not np.array_equal(value, all_weights(tiny_model(0))[name]) for name, value in trained.items())
    mapped.save_pretrained(tmp_path / "a")
    plain.save_pretrained(tmp_path / "b")
    assert digest(tmp_path / "a" / "model.safetensors") == digest(tmp_path / "b" / "model.safetensors")


def private_dirty_bytes(array: np.ndarray) -> int:
    """Bytes of the mapping holding ``array`` that this process has copied (written), from
    Linux's /proc/self/smaps (Private_Dirty of the region containing the array)."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            first = line.split()[0]
            if "-" in first and ":" not in first:  # a region's header line: start-end perms ...
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= address < end
            elif inside and first == "Private_Dirty:":
                return int(line.split()[1]) * 1024
    raise AssertionError("the array's mapping is not in /proc/self/smaps")


@maps_files
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_only_written_pages_are_copied(tmp_path):
    model = mp.LlamaForCausalLM(mp.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=4, max_position_embeddings=32))
    for p in model.parameters():
        p.data = np.ones(p.shape, np.float32)
    model.save_pretrained(tmp_path / "m")
    loaded = mp.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    weight = loaded.model.layers[0].mlp.up_proj.weight.data  # 512 KiB
    assert private_dirty_bytes(weight) == 0  # read (the finite check), never copied
    weight[:64] += 1.0  # 64 rows of 1 KiB: 16 pages of 4 KiB
    assert 64 * 1024 <= private_dirty_bytes(weight) <= 64 * 1024 + 2 * mmap.PAGESIZE
    assert private_dirty_bytes(weight) < weight.nbytes // 4


# ----- GGUF: a model load skips the tokenizer's metadata arrays ---------------------------------
@settings(max_examples=25, deadline=None)
@given(tokens=st.lists(st.text(max_size=6), max_size=20), types=st.lists(st.integers(0, 6), max_size=20),
       scores=st.lists(st.floats(-10, 10, width=32), max_size=5))
def test_gguf_reader_without_arrays_agrees_on_everything_else(tmp_path_factory, tokens, types, scores):
    path = tokenizer_only(tmp_path_factory.mktemp("g") / "t.gguf", {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "general.name": "after the arrays"})
    full = gguf.GGUFReader(path)  # gguf's own reader, arrays as NumPy views
    for decoded in (True, False):
        fast = open_gguf(path, arrays=decoded)
        assert list(full.fields) == list(fast.fields)
        for key, field in full.fields.items():
            other = fast.fields[key]
            assert (other.offset, other.types) == (field.offset, field.types)
            if field.types[0] == gguf.GGUFValueType.ARRAY:  # length kept, parts not built
                assert int(other.parts[4][0]) == len(field.data) and other.data == []
                assert fast.arrays.get(key) == (field.contents() if decoded else None)
            else:
                assert other.contents() == field.contents()
        assert fast.data_offset == full.data_offset


def test_gguf_reader_without_arrays_refuses_an_array_past_the_end(tmp_path):
    path = tokenizer_only(tmp_path / "t.gguf", {"tokenizer.ggml.tokens": ["a", "bc"]})
    raw = bytearray(path.read_bytes())
    at = raw.index(b"bc") - 8  # the last string's length field
    raw[at:at + 8] = (10**6).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(mp.errors.CheckpointError, match="t.gguf"):
        open_gguf(path, arrays=False)
