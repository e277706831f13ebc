"""Our safetensors reader/writer: round trips, the reference package as an oracle
in both directions, and one clear error per kind of corrupt file."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.errors import CheckpointError
from minipeft.io import atomic_write, read_safetensors, read_safetensors_header, write_safetensors
from minipeft.io.safetensors import DTYPES

DTYPE_NAMES = list(DTYPES)


def random_array(rng, dtype_name, shape):
    """Any bit pattern (NaN, inf, -0 included) for numeric types; 0/1 for BOOL."""
    dtype = DTYPES[dtype_name]
    if dtype_name == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    n = int(np.prod(shape, dtype=np.int64))
    raw = rng.integers(0, 256, size=n * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def assert_bitwise_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


tensor_specs = st.dictionaries(
    keys=st.text(alphabet="abcxyz._0123456789é", min_size=1, max_size=12).filter(
        lambda k: k != "__metadata__"),
    values=st.tuples(st.sampled_from(DTYPE_NAMES),
                     st.lists(st.integers(0, 4), min_size=0, max_size=3)),
    min_size=0, max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(specs=tensor_specs, seed=st.integers(0, 2**32 - 1),
       metadata=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_round_trip_every_dtype(tmp_path_factory, specs, seed, metadata):
    rng = np.random.default_rng(seed)
    tensors = {k: random_array(rng, d, tuple(s)) for k, (d, s) in specs.items()}
    path = tmp_path_factory.mktemp("rt") / "t.safetensors"
    write_safetensors(path, tensors, metadata)
    loaded = read_safetensors(path)
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert_bitwise_equal(loaded[k], tensors[k])
        assert loaded[k].flags.aligned and loaded[k].flags.writeable
    infos, meta = read_safetensors_header(path)
    assert meta == (metadata or {})
    for k, info in infos.items():  # every tensor aligned to its item size
        assert info.begin % DTYPES[info.dtype].itemsize == 0
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert n % 8 == 0


def test_non_contiguous_and_big_endian_inputs(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"t": a.T, "be": a.astype(">f4")})
    loaded = read_safetensors(path)
    np.testing.assert_array_equal(loaded["t"], a.T)
    np.testing.assert_array_equal(loaded["be"], a)
    assert loaded["be"].dtype == np.float32


def test_unsupported_dtype_names_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"'weird'.*complex64.*F32"):
        write_safetensors(tmp_path / "t.safetensors", {"weird": np.zeros(2, np.complex64)})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype_name", [d for d in DTYPE_NAMES if d != "BF16"])
def test_reference_reads_ours_and_we_read_reference(tmp_path, dtype_name):
    st_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {"b.w": random_array(rng, dtype_name, (3, 5)),
               "a.s": random_array(rng, dtype_name, ()),
               "c.e": random_array(rng, dtype_name, (0, 2)),
               "f32": random_array(rng, "F32", (7,))}  # mixed dtypes in one file
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, tensors, {"format": "np"})
    for k, v in st_numpy.load_file(str(ours)).items():
        assert_bitwise_equal(v, tensors[k])
    ref = tmp_path / "ref.safetensors"
    st_numpy.save_file(tensors, str(ref), metadata={"format": "np"})
    loaded = read_safetensors(ref)
    assert loaded.keys() == tensors.keys()
    for k, v in loaded.items():
        assert_bitwise_equal(v, tensors[k])


def test_bf16_against_torch(tmp_path):
    try:
        import torch
        from safetensors.torch import load_file, save_file
    except ImportError:
        pytest.skip("torch not installed")
    rng = np.random.default_rng(1)
    x = random_array(rng, "BF16", (4, 6))
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, {"x": x, "y": np.ones(3, np.float32)})
    t = load_file(str(ours))["x"]
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.view(torch.int16).numpy(), x.view(np.int16))
    ref = tmp_path / "ref.safetensors"
    save_file({"x": t, "h": t.to(torch.float16)}, str(ref))
    loaded = read_safetensors(ref)
    assert loaded["x"].dtype == ml_dtypes.bfloat16
    assert_bitwise_equal(loaded["x"], x)
    assert_bitwise_equal(loaded["h"], t.to(torch.float16).numpy())


def test_cupy_arrays_are_written(tmp_path):
    cp = pytest.importorskip("cupy")
    from minipeft.backend import gpu_available
    if not gpu_available():
        pytest.skip("no CUDA device")
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_safetensors(tmp_path / "g.safetensors", {"a": cp.asarray(a)})
    np.testing.assert_array_equal(read_safetensors(tmp_path / "g.safetensors")["a"], a)


# ---- corrupt files: each must name the file, the key where there is one, and what was expected


def good_file(tmp_path):
    """Write a valid file; return its path, header dict and data bytes."""
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, {"x": np.ones((2, 3), np.float32), "y": np.arange(5, dtype=np.int8)})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return path, json.loads(raw[8:8 + n]), raw[8 + n:]


def rewrite(path, header, data):
    """Write ``header`` (dict, or raw bytes) and ``data`` back as a file."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def expect_error(path, *needles):
    for reader in (read_safetensors, read_safetensors_header):
        with pytest.raises(CheckpointError) as info:
            reader(path)
        message = str(info.value)
        assert path.name in message
        for needle in needles:
            assert needle in message, message


def test_file_shorter_than_8_bytes(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    expect_error(path, "at least 8")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nothing.safetensors", "does not exist")


def test_header_length_larger_than_file(tmp_path):
    path, _, _ = good_file(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[:8] = (10**6).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    expect_error(path, "header length 1000000")


@pytest.mark.parametrize("header, needle", [
    (b"\xff\xfe{}", "UTF-8 JSON"),
    (b"{not json", "UTF-8 JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, '
     b'"x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}', "duplicate key 'x'"),
    (b'{"__metadata__": {"a": 1}}', "__metadata__"),
])
def test_bad_header(tmp_path, header, needle):
    path, _, data = good_file(tmp_path)
    rewrite(path, header, data)
    expect_error(path, needle)


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_entry_missing_field(tmp_path, field):
    path, header, data = good_file(tmp_path)
    del header["x"][field]
    rewrite(path, header, data)
    expect_error(path, "'x'", repr(field))


@pytest.mark.parametrize("field, value, needle", [
    ("shape", "2x3", "shape must be a list"),
    ("shape", [2, -3], "shape must be a list"),
    ("shape", [2, True], "shape must be a list"),
    ("data_offsets", [0], "data_offsets must be"),
    ("data_offsets", [0, "24"], "data_offsets must be"),
    ("dtype", "F8_E4M3", "supported: F64, F32"),
    ("dtype", "C64", "unsupported dtype 'C64'"),
])
def test_entry_wrong_types(tmp_path, field, value, needle):
    path, header, data = good_file(tmp_path)
    header["x"][field] = value
    rewrite(path, header, data)
    expect_error(path, "'x'", needle)


def test_entry_not_an_object(tmp_path):
    path, header, data = good_file(tmp_path)
    header["x"] = [1, 2]
    rewrite(path, header, data)
    expect_error(path, "'x'", "expected an object")


def test_begin_after_end(tmp_path):
    path, header, data = good_file(tmp_path)
    header["y"]["data_offsets"] = [29, 24]
    rewrite(path, header, data)
    expect_error(path, "'y'", "begin 29 is after end 24")


def test_byte_size_does_not_match_shape(tmp_path):
    path, header, data = good_file(tmp_path)
    header["x"]["shape"] = [2, 2]
    rewrite(path, header, data)
    expect_error(path, "'x'", "span 24 bytes but shape [2, 2] of F32 needs 16")


def test_offsets_beyond_buffer(tmp_path):
    path, header, data = good_file(tmp_path)
    header["y"]["data_offsets"] = [100, 105]
    rewrite(path, header, data)
    expect_error(path, "'y'", "needs bytes up to 105 but the data section has 29")


def test_truncated_file(tmp_path):
    path, _, _ = good_file(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    expect_error(
        path, "file is truncated: tensor 'y' needs bytes up to 29 but the data section has 26"
    )


# ---- atomic writes


def test_writer_leaves_no_temp_file(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(3, np.float32)})
    write_safetensors(tmp_path / "a.safetensors", {"x": np.ones(3, np.float32)})  # overwrite
    assert os.listdir(tmp_path) == ["a.safetensors"]
    np.testing.assert_array_equal(read_safetensors(tmp_path / "a.safetensors")["x"], 1)


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]
