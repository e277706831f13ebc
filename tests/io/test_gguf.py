"""GGUF models: files written as llama.cpp's converter writes them load to the same logits
as the transformers folder they came from; files minipeft writes read back in ``gguf``
and here; what minipeft cannot load is refused by name."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.errors import CheckpointError, ConfigError, MiniPeftError
from minipeft.io.gguf import gguf_name, hf_name, read_gguf, to_interleaved, to_rotate_half
from minipeft.io.gguf_writer import write_gguf
from tests.io.gguf_helpers import convert, gguf, llama3_rope_factors, permute, read_folder, roundtrip, write_folder
from tests.peft.helpers import assert_logits_close, hf_checkpoint, hf_model, our_logits

Q = gguf.GGMLQuantizationType
# Rows of 64 / 96 inputs: whole Q8_0 / Q4_0 blocks (32), so every matrix is quantised.
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             max_position_embeddings=64)
MODELS = {
    "gqa": dict(SIZES, num_key_value_heads=2),
    "mha": dict(SIZES, num_key_value_heads=4),
    "mha_tied": dict(SIZES, num_key_value_heads=4, tie_word_embeddings=True),
}
IDS = np.random.default_rng(5).integers(0, 128, (2, 9))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_checkpoint(root / name, seed=i, **kw) for i, (name, kw) in enumerate(MODELS.items())}


# ----- names and row order --------------------------------------------------------------------
def test_every_llama_tensor_name_maps_both_ways():
    model = mp.LlamaForCausalLM(mp.LlamaConfig(**MODELS["gqa"], num_hidden_layers=2, attention_bias=True, mlp_bias=True))
    names = list(model.state_dict())
    assert "model.layers.1.self_attn.q_proj.bias" in names
    for name in names:
        assert hf_name(gguf_name(name)) == name
    assert gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert hf_name("rope_freqs.weight") is None


@given(heads=st.integers(1, 4), half=st.integers(1, 5), cols=st.integers(0, 3))
def test_permutation_is_llama_cpps_and_undone(heads, half, cols):
    rows = np.arange(heads * 2 * half * max(cols, 1), dtype=np.float32).reshape(
        (heads * 2 * half, cols) if cols else (heads * 2 * half,))
    interleaved = to_interleaved(rows, heads)
    np.testing.assert_array_equal(interleaved, permute(rows, heads, None))  # convert_hf_to_gguf's
    np.testing.assert_array_equal(to_rotate_half(interleaved, heads), rows)
    # GGUF row 2j + a of a head holds HF row a*half + j of that head
    for h in range(heads):
        for j in range(half):
            for a in (0, 1):
                np.testing.assert_array_equal(interleaved[h * 2 * half + 2 * j + a], rows[h * 2 * half + a * half + j])


# ----- loading files written as llama.cpp writes them -----------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_f32_gguf_gives_the_folders_logits(tmp_path, folders, name):
    ids = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}  # transformers' defaults
    path = convert(folders[name], tmp_path / "m.gguf", Q.F32, tokenizer=ids)
    from_gguf = mp.LlamaForCausalLM.from_pretrained(path)
    from_folder = mp.LlamaForCausalLM.from_pretrained(folders[name])
    assert from_gguf.config == from_folder.config
    assert_logits_close(our_logits(from_gguf, IDS), our_logits(from_folder, IDS), rtol=1e-6)
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        expected = hf_model(folders[name])(torch.tensor(IDS)).logits.numpy()
    assert_logits_close(our_logits(from_gguf, IDS), expected, rtol=1e-5)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("name", ["gqa", "mha_tied"])
def test_quantized_gguf_equals_its_dequantized_weights(tmp_path, folders, name, qtype):
    """The quantisation error is exactly the format's: the GGUF model's logits equal those of the
    transformers folder whose weights went through gguf's quantize -> dequantize."""
    path = convert(folders[name], tmp_path / "m.gguf", qtype)
    _, tensors = read_folder(folders[name])
    reference = write_folder(tmp_path / "ref", folders[name], {k: roundtrip(v, qtype) for k, v in tensors.items()})
    got = our_logits(mp.LlamaForCausalLM.from_pretrained(path), IDS)
    assert_logits_close(got, our_logits(mp.LlamaForCausalLM.from_pretrained(reference), IDS), rtol=1e-6)
    # and the format did round: the logits moved, but not far. These random weights are the worst
    # case for 16 levels per block of 32 (no outliers to spend the range on): 4-bit moves them ~30%.
    exact = our_logits(mp.LlamaForCausalLM.from_pretrained(folders[name]), IDS)
    moved = np.abs(got - exact).max() / np.abs(exact).max()
    assert 0 < moved < (0.5 if qtype in (Q.Q4_0, Q.Q4_1) else 0.05)


def test_read_gguf_returns_config_and_hf_tensors(tmp_path, folders):
    config, tensors = read_gguf(convert(folders["gqa"], tmp_path / "m.gguf", Q.F32))
    assert config["num_key_value_heads"] == 2 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is False
    _, original = read_folder(folders["gqa"])
    assert set(tensors) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


# ----- Qwen2: q/k/v biases, q/k rows in transformers' order ------------------------------------
QWEN2 = {
    "qwen2": dict(SIZES, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2_tied": dict(SIZES, num_key_value_heads=1, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def qwen2_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    return {name: hf_checkpoint(root / name, seed=3, family="qwen2", **kw) for name, kw in QWEN2.items()}


@pytest.mark.parametrize("name", list(QWEN2))
def test_qwen2_gguf_gives_transformers_logits(tmp_path, qwen2_folders, name):
    """convert_hf_to_gguf.py's Qwen2 layout (arch qwen2, q/k/v biases, rows not permuted) loads to
    transformers' Qwen2 logits, as a qwen2 model."""
    folder = qwen2_folders[name]
    path = convert(folder, tmp_path / "q.gguf", Q.F32, arch="qwen2")  # Qwen2Config: no bos / eos ids
    from_gguf = mp.LlamaForCausalLM.from_pretrained(path)
    assert from_gguf.config.model_type == "qwen2" and from_gguf.config.qkv_bias and not from_gguf.config.o_bias
    assert from_gguf.config == mp.LlamaForCausalLM.from_pretrained(folder).config
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        expected = hf_model(folder)(torch.tensor(IDS)).logits.numpy()
    assert_logits_close(our_logits(from_gguf, IDS), expected, rtol=1e-5)


def test_qwen2_gguf_without_its_biases_is_refused_by_name(tmp_path, qwen2_folders):
    config, tensors = read_folder(qwen2_folders["qwen2"])
    folder = write_folder(tmp_path / "nobias", qwen2_folders["qwen2"],
                          {k: v for k, v in tensors.items() if not k.endswith("k_proj.bias")})
    path = convert(folder, tmp_path / "q.gguf", Q.F32, arch="qwen2")
    with pytest.raises(CheckpointError, match="'blk.0.attn_k.bias' is missing"):
        mp.LlamaForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_transformers_reads_the_qwen2_gguf_minipeft_writes(tmp_path, qwen2_folders, kind):
    """minipeft writes a qwen2-architecture file with q/k rows unpermuted; transformers' own GGUF
    loader gets minipeft's model from it, and so does minipeft."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = mp.LlamaForCausalLM.from_pretrained(qwen2_folders["qwen2"])
    write_gguf(tmp_path / "q.gguf", model.config.to_dict(), model.state_dict(), kind)
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    if kind == "f32":
        q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
        np.testing.assert_array_equal(np.asarray(q.data), model.state_dict()["model.layers.1.self_attn.q_proj.weight"])
    ours = our_logits(mp.LlamaForCausalLM.from_pretrained(tmp_path / "q.gguf"), IDS)
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf",
                                                               **{dtype_kw: torch.float32}).eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        expected = theirs(torch.tensor(IDS)).logits.numpy()
    assert_logits_close(ours, expected, rtol=1e-5)
    if kind == "f32":
        assert_logits_close(ours, our_logits(model, IDS), rtol=1e-6)


# ----- Llama 3's RoPE scaling: the rope_freqs.weight tensor ------------------------------------
LLAMA3 = {  # head_dim 16: 8 frequencies; wavelengths 2π·θ^(j/8)
    # Llama 3.2's numbers: one frequency in the band, found by trying Llama 3's published values
    "llama3.2": dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)),
    # two frequencies in the band (wavelengths 628 and 1987 in [256, 2048]): fitted
    "fitted": dict(rope_theta=10000.0, rope_scaling=dict(
        rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=8.0,
        original_max_position_embeddings=2048)),
    # the same divisors from other numbers ((L, low, high) scaled by 2): read back as the ones above
    "scaled": dict(rope_theta=10000.0, rope_scaling=dict(
        rope_type="llama3", factor=16.0, low_freq_factor=2.0, high_freq_factor=16.0,
        original_max_position_embeddings=4096)),
}


@pytest.fixture(scope="module")
def llama3_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3")
    return {name: hf_checkpoint(root / name, seed=7, **SIZES, num_key_value_heads=2, **copy.deepcopy(kw))
            for name, kw in LLAMA3.items()}  # a copy: transformers adds rope_theta to the dict it is given


@pytest.mark.parametrize("name", list(LLAMA3))
def test_llama3_rope_factors_give_transformers_logits(tmp_path, llama3_folders, name):
    """A GGUF with the rope_freqs.weight llama.cpp's converter computes loads to transformers'
    logits for the llama3-scaled folder it came from, with the rope_scaling read back from it."""
    folder = llama3_folders[name]
    config = read_folder(folder)[0]
    factors = llama3_rope_factors(config)
    assert factors.min() == 1 and factors.max() == 16 * (1 + (name == "llama3.2"))  # all three regions
    assert ((factors > 1) & (factors < factors.max())).sum() == (1 if name == "llama3.2" else 2)
    ids = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}  # transformers' defaults
    path = convert(folder, tmp_path / "m.gguf", Q.F32, tokenizer=ids,
                   extra_tensors={"rope_freqs.weight": (factors, Q.F32)})
    from_gguf = mp.LlamaForCausalLM.from_pretrained(path)
    wanted = dict(LLAMA3["fitted" if name == "scaled" else name]["rope_scaling"])
    assert from_gguf.config.rope_scaling == wanted
    if name != "scaled":
        assert from_gguf.config == mp.LlamaForCausalLM.from_pretrained(folder).config
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        expected = hf_model(folder)(torch.tensor(IDS)).logits.numpy()
    assert_logits_close(our_logits(from_gguf, IDS), expected, rtol=1e-5)
    # without the tensor the numbers are not these: the factors are read, not ignored
    plain = convert(folder, tmp_path / "plain.gguf", Q.F32)
    assert np.abs(our_logits(mp.LlamaForCausalLM.from_pretrained(plain), IDS) - expected).max() > 1e-3


def test_llama3_rope_factors_round_trip_through_the_writer(tmp_path, llama3_folders):
    """minipeft writes the tensor llama.cpp's converter writes, and reads its own file back."""
    model = mp.LlamaForCausalLM.from_pretrained(llama3_folders["fitted"])
    write_gguf(tmp_path / "w.gguf", model.config.to_dict(), model.state_dict(), "f32")
    reader = gguf.GGUFReader(tmp_path / "w.gguf")
    written = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert written.tensor_type.name == "F32"
    converters = llama3_rope_factors(read_folder(llama3_folders["fitted"])[0])
    np.testing.assert_array_equal(np.asarray(written.data), converters)
    back = mp.LlamaForCausalLM.from_pretrained(tmp_path / "w.gguf")
    assert (back.config.rope_scaling, back.config.rope_theta) == (LLAMA3["fitted"]["rope_scaling"], 10000.0)
    assert_logits_close(our_logits(back, IDS), our_logits(model, IDS), rtol=1e-6)


# ----- metadata arrays: read with struct, the same values as gguf's reader --------------------
@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_metadata_arrays_read_as_ggufs_reader_reads_them(tmp_path, endian):
    from minipeft.io.gguf import metadata_value, open_gguf
    path = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=getattr(gguf.GGUFEndian, endian))
    w.add_array("t.strings", ["a", "", "Ġthe", "é🙂", "x y"])
    w.add_array("t.ints", [0, -3, 2**31 - 1])
    w.add_array("t.floats", [0.5, -1e-5, 3.25])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.empty_strings", [""])
    w.add_string("t.scalar", "plain")
    w.add_uint32("t.count", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs = gguf.GGUFReader(path)
    for arrays in (True, False):
        reader = open_gguf(path, arrays=arrays)
        for key, field in theirs.fields.items():
            if key.startswith("GGUF.") or (not arrays and field.types[0] == gguf.GGUFValueType.ARRAY):
                continue
            got = metadata_value(reader, key, path)
            assert got == field.contents() and type(got) is type(field.contents()), key
        assert reader.fields["t.strings"].parts[4][0] == 5  # the length is kept either way


def test_a_metadata_string_that_is_not_utf8_is_named_when_read(tmp_path):
    from minipeft.io.gguf import metadata_value, open_gguf
    path = tmp_path / "u.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.strings", ["ok", "zz"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes().replace(b"zz", b"\xff\xfe")
    path.write_bytes(data)
    reader = open_gguf(path)  # opening works; the bad array is an error when it is asked for
    with pytest.raises(CheckpointError, match=r"metadata 't.strings' is unreadable"):
        metadata_value(reader, "t.strings", path)


# ----- refusals -------------------------------------------------------------------------------
def test_unsupported_architecture_is_refused_by_name(tmp_path, folders):
    path = convert(folders["gqa"], tmp_path / "m.gguf", Q.F32, arch="gemma")
    with pytest.raises(CheckpointError, match="general.architecture is 'gemma'"):
        mp.LlamaForCausalLM.from_pretrained(path)


def test_unsupported_quant_type_is_refused_by_name(tmp_path, folders):
    blocks = np.zeros(2 * 18, dtype=np.uint8)  # IQ4_NL: 18 bytes per 32 weights
    path = convert(folders["gqa"], tmp_path / "m.gguf", Q.F32,
                   extra_tensors={"blk.0.attn_q.bias": (blocks, Q.IQ4_NL)})
    with pytest.raises(CheckpointError, match="'blk.0.attn_q.bias' is stored as IQ4_NL"):
        mp.LlamaForCausalLM.from_pretrained(path)


def test_rope_factors_that_are_not_llama3s_are_refused_by_name(tmp_path, folders):
    """rope_freqs.weight must be Llama 3's divisors, one per frequency, F32, and not beside another scaling."""
    head_dim = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    cases = [
        ((np.linspace(1, 9, head_dim // 2) ** 2).astype(np.float32), Q.F32, {}, "Llama 3-style"),  # no band
        (np.ones(head_dim // 2 + 1, np.float32), Q.F32, {}, "needs 8"),
        (np.full(head_dim // 2, 0.5, np.float32), Q.F32, {}, "divisors >= 1"),
        (np.ones(head_dim // 2, np.float16), Q.F16, {}, "stored as F16"),
        (np.ones(head_dim // 2, np.float32), Q.F32,
         {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2}, "one or the other"),
    ]
    for i, (values, kind, fields, match) in enumerate(cases):
        path = convert(folders["gqa"], tmp_path / f"m{i}.gguf", Q.F32, tokenizer=fields,
                       extra_tensors={"rope_freqs.weight": (values, kind)})
        with pytest.raises(CheckpointError, match=f"rope_freqs.weight.*{match}|{match}.*rope_freqs.weight") as caught:
            mp.LlamaForCausalLM.from_pretrained(path)
        assert str(path) in str(caught.value)


def test_missing_hyperparameter_is_named(tmp_path, folders):
    path = convert(folders["gqa"], tmp_path / "m.gguf", Q.F32, skip_metadata=("block_count",))
    with pytest.raises(CheckpointError, match="'llama.block_count' is missing"):
        mp.LlamaForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_file_is_a_checkpoint_error(tmp_path, folders, damage):
    good = convert(folders["gqa"], tmp_path / "good.gguf", Q.F32).read_bytes()
    data = {"garbage": b"GGUF" + bytes(range(256)) * 4, "truncated": good[: len(good) // 2], "empty": b""}[damage]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        mp.LlamaForCausalLM.from_pretrained(path)


def test_a_non_finite_weight_is_refused_by_key(tmp_path, folders):
    """A NaN in a dequantized tensor would make every logit NaN: refused, naming the file and key."""
    _, tensors = read_folder(folders["gqa"])
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    path = convert(write_folder(tmp_path / "nan", folders["gqa"], tensors), tmp_path / "nan.gguf", Q.F32)
    with pytest.raises(CheckpointError, match=r"nan\.gguf.*model\.layers\.0\.mlp\.up_proj\.weight.*non-finite"):
        mp.LlamaForCausalLM.from_pretrained(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        mp.LlamaForCausalLM.from_pretrained(tmp_path / "nothing.gguf")


def test_cli_reports_a_refused_gguf_in_one_line(tmp_path, folders, capsys):
    from minipeft.cli import main
    path = convert(folders["gqa"], tmp_path / "m.gguf", Q.F32, arch="phi3")
    assert main(["generate", "--model", str(path), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("minipeft: error:") and "'phi3'" in err and "\n" not in err


# ----- writing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_written_gguf_reads_back_in_gguf_and_here(tmp_path, folders, kind):
    model = mp.LlamaForCausalLM.from_pretrained(folders["gqa"])
    path = tmp_path / "out.gguf"
    types = write_gguf(path, model.config.to_dict(), model.state_dict(), kind)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    assert stored == types and stored["blk.0.attn_norm.weight"] == "F32"
    assert stored["blk.0.attn_q.weight"] == kind.upper()
    # q rows are in llama.cpp's order in the file
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    hf_q = model.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    if kind == "f32":
        np.testing.assert_array_equal(np.asarray(q.data), permute(hf_q, 4, 4))
    qtype = getattr(Q, kind.upper())
    reference = write_folder(tmp_path / "ref", folders["gqa"],
                             {k: roundtrip(v, qtype) for k, v in read_folder(folders["gqa"])[1].items()})
    assert_logits_close(our_logits(mp.LlamaForCausalLM.from_pretrained(path), IDS),
                        our_logits(mp.LlamaForCausalLM.from_pretrained(reference), IDS), rtol=1e-6)


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path):
    model = mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path())  # intermediate_size 172
    types = write_gguf(tmp_path / "b.gguf", model.config.to_dict(), model.state_dict(), "q8_0")
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    assert "output.weight" not in types  # tied head: llama.cpp reuses token_embd


@pytest.mark.parametrize("change, match", [
    (dict(model_type="phi3"), "model_type 'phi3'"),
    (dict(model_type="qwen2", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     "llama-architecture files only"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), "rope_scaling type 'yarn'"),
])
def test_writer_refuses_what_it_cannot_write(tmp_path, change, match):
    model = mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path())
    with pytest.raises(ConfigError, match=match):
        write_gguf(tmp_path / "x.gguf", {**model.config.to_dict(), **change}, model.state_dict(), "f32")
    assert not (tmp_path / "x.gguf").exists()


def test_writer_refuses_an_unknown_type(tmp_path):
    model = mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path())
    with pytest.raises(ConfigError, match="'q3_k'"):
        write_gguf(tmp_path / "x.gguf", model.config.to_dict(), model.state_dict(), "q3_k")


# ----- damaged headers: only minipeft's own errors -------------------------------------------
@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, folders):
    path = convert(folders["gqa"], tmp_path_factory.mktemp("fuzz") / "m.gguf", Q.F32,
                   tokenizer={"tokenizer.ggml.bos_token_id": 1})
    return path, int(gguf.GGUFReader(path).data_offset)


@settings(max_examples=500)
@given(data=st.data())
def test_a_mutated_header_loads_or_raises_minipeft_errors(small_gguf, data):
    good, header_end = small_gguf
    buffer = bytearray(good.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header_end - 1))
        buffer[at] = data.draw(st.integers(0, 255))
    path = good.with_name("mutated.gguf")
    path.write_bytes(bytes(buffer))
    try:
        mp.LlamaForCausalLM.from_pretrained(path)
    except MiniPeftError:
        pass


def test_tensors_whose_data_overlap_are_refused(tmp_path, folders):
    """A header edited so that two tensors share bytes would load a wrong model silently."""
    path = convert(folders["gqa"], tmp_path / "m.gguf", Q.F32)
    reader = gguf.GGUFReader(path)
    first, second = sorted((t for t in reader.tensors if t.name.endswith("attn_norm.weight")),
                           key=lambda t: int(t.data_offset))
    # a tensor-info entry ends with the tensor's data offset (uint64, relative to the data section)
    info_end = second.field.offset + sum(part.nbytes for part in second.field.parts)
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[info_end - 8:info_end], "little") == int(second.data_offset) - int(reader.data_offset)
    data[info_end - 8:info_end] = (int(first.data_offset) - int(reader.data_offset)).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="overlaps"):
        mp.LlamaForCausalLM.from_pretrained(path)


def test_biases_round_trip_with_their_rows_permuted(tmp_path):
    from tests.peft.helpers import tiny_model
    model = tiny_model(seed=2, attention_bias=True, mlp_bias=True)
    path = tmp_path / "b.gguf"
    write_gguf(path, model.config.to_dict(), model.state_dict(), "f32")
    reader = gguf.GGUFReader(path)
    q_bias = next(t for t in reader.tensors if t.name == "blk.0.attn_q.bias")
    heads = model.config.num_attention_heads
    np.testing.assert_array_equal(np.asarray(q_bias.data),
                                  permute(model.state_dict()["model.layers.0.self_attn.q_proj.bias"], heads, None))
    config, tensors = read_gguf(path)
    assert config["attention_bias"] and config["mlp_bias"]
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"])
def test_other_block_types_load_as_ggufs_own_dequantization(tmp_path, kind):
    """gguf cannot quantise to K-quants, so their blocks are random bytes below 0x3C (every fp16
    scale in them is then finite, |d| < 1): each tensor must load as gguf.quants.dequantize of its
    blocks, q/k rows put back in HF order."""
    qtype = getattr(Q, kind)
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    config = dict(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
    shapes = mp.LlamaForCausalLM(mp.LlamaConfig(**config)).state_dict()
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for key, value in dict(block_count=1, context_length=64, embedding_length=256, feed_forward_length=256,
                           **{"attention.head_count": 4, "attention.head_count_kv": 2}).items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    expected = {}
    for name, value in shapes.items():
        if value.ndim == 1:
            data = (0.01 + 0.001 * rng.standard_normal(value.shape)).astype(np.float32)  # keeps silu in range
            writer.add_tensor(gguf_name(name), data)
            expected[name] = data
            continue
        blocks = rng.integers(0, 0x3C, (value.shape[0], value.shape[1] // block * size), dtype=np.uint8)
        writer.add_tensor(gguf_name(name), blocks, raw_dtype=qtype)
        dequantized = gguf.quants.dequantize(blocks, qtype).reshape(value.shape)
        heads = {"q_proj": 4, "k_proj": 2}.get(name.split(".")[-2])
        if heads:  # undo convert_hf_to_gguf's permute: its inverse swaps the same axes back
            dequantized = dequantized.reshape(heads, -1, 2, 256).swapaxes(1, 2).reshape(value.shape)
        expected[name] = dequantized
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, tensors = read_gguf(tmp_path / "k.gguf")
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    model = mp.LlamaForCausalLM.from_pretrained(tmp_path / "k.gguf")
    with np.errstate(over="ignore"):  # random blocks make huge gate values; silu saturates, stays finite
        assert np.isfinite(our_logits(model, IDS % 64)).all()


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_transformers_reads_the_gguf_minipeft_writes(tmp_path, kind):
    """An independent GGUF reader (transformers' ``gguf_file=`` loader, which undoes llama.cpp's
    permutation itself) gets the model minipeft gets from the same file."""
    from minipeft.io.gguf_tokenizer import tokenizer_fields_from_folder
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = mp.bundled_model_path()
    model = mp.LlamaForCausalLM.from_pretrained(folder)
    write_gguf(tmp_path / "s.gguf", model.config.to_dict(), model.state_dict(), kind,
               tokenizer_fields_from_folder(folder, 512))
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="s.gguf",
                                                               **{dtype_kw: torch.float32}).eval()
    ids = IDS % 512
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).logits.numpy()
    assert_logits_close(our_logits(mp.LlamaForCausalLM.from_pretrained(tmp_path / "s.gguf"), ids), expected)
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    ours = mp.Tokenizer.from_pretrained(tmp_path / "s.gguf")
    for text in ["Once upon a time", "Lily's dog ran 12 miles!", "Héllo café 🙂", "a\nb"]:
        assert ours.encode(text) == their_tokenizer(text).input_ids, text
