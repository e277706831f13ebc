"""HF model folders: single file and sharded saves, index checks, clear errors,
and the bundled model."""
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from minipeft.data import bundled_model_path
from minipeft.errors import CheckpointError, ConfigError
from minipeft.io import load_model_tensors, read_json, read_safetensors_header, save_model_tensors

INDEX = "model.safetensors.index.json"


def tiny_tensors():
    rng = np.random.default_rng(0)
    out = {"model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32)}
    for i in range(3):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16)
        out[p + "mlp.up_proj.weight"] = rng.standard_normal((12, 8)).astype(np.float16)
        out[p + "input_layernorm.weight"] = np.ones(8, np.float32)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_sharded_round_trip_equals_single(tmp_path):
    tensors = tiny_tensors()
    save_model_tensors(tmp_path / "one", tensors)
    save_model_tensors(tmp_path / "many", tensors, max_shard_bytes=600)
    files = sorted(os.listdir(tmp_path / "many"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and INDEX in files and "model.safetensors" not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "many" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for shard in shards:  # transformers refuses safetensors files without format=pt
        assert read_safetensors_header(tmp_path / "many" / shard)[1] == {"format": "pt"}
    one = load_model_tensors(tmp_path / "one")
    assert_same(one, tensors)
    assert_same(load_model_tensors(tmp_path / "many"), one)


def test_resave_switches_layout_without_stale_files(tmp_path):
    tensors = tiny_tensors()
    save_model_tensors(tmp_path, tensors, max_shard_bytes=600)
    save_model_tensors(tmp_path, tensors)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    save_model_tensors(tmp_path, tensors, max_shard_bytes=600)
    assert "model.safetensors" not in os.listdir(tmp_path)
    assert_same(load_model_tensors(tmp_path), tensors)


def test_bad_max_shard_bytes(tmp_path):
    with pytest.raises(ConfigError, match="max_shard_bytes"):
        save_model_tensors(tmp_path, tiny_tensors(), max_shard_bytes=0)


def sharded(tmp_path):
    save_model_tensors(tmp_path, tiny_tensors(), max_shard_bytes=600)
    return json.loads((tmp_path / INDEX).read_text())


def test_index_key_missing_from_shard(tmp_path):
    index = sharded(tmp_path)
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        load_model_tensors(tmp_path)
    msg = str(info.value)
    assert "'lm_head.weight'" in msg and "model-00001-of-00003.safetensors" in msg and INDEX in msg


@pytest.mark.parametrize("key", ["model.layers.2.mlp.up_proj.weight",  # shard keeps others
                                 "model.embed_tokens.weight"])  # its shard becomes unlisted
def test_shard_holds_key_not_in_index(tmp_path, key):
    index = sharded(tmp_path)
    shard = index["weight_map"].pop(key)
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        load_model_tensors(tmp_path)
    msg = str(info.value)
    assert shard in msg and INDEX in msg
    if shard in index["weight_map"].values():
        assert repr(key) in msg


def test_index_names_missing_shard(tmp_path):
    index = sharded(tmp_path)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*does not exist"):
        load_model_tensors(tmp_path)
    index["weight_map"]["x"] = "../elsewhere.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="same folder"):
        load_model_tensors(tmp_path)


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_tensors(tmp_path / "nowhere")
    with pytest.raises(CheckpointError) as info:
        load_model_tensors(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "model.safetensors" in msg and INDEX in msg
    assert "pytorch_model.bin" not in msg
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin, which is not supported"):
        load_model_tensors(tmp_path)


def test_read_json_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"model config '.*nope.json' does not exist"):
        read_json(tmp_path / "nope.json", "model config")
    bad = tmp_path / "config.json"
    bad.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(ConfigError, match=r"config.json' is not valid JSON: .* line 4, column 1"):
        read_json(bad, "model config", ConfigError)
    bad.write_text("[1]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        read_json(bad, "model config")
    bad.write_text('{"a": [1, 2]}')
    assert read_json(bad, "model config") == {"a": [1, 2]}


def test_bundled_model_loads():
    tensors = load_model_tensors(bundled_model_path())
    assert all(a.dtype == np.float32 for a in tensors.values())
    assert sum(a.size for a in tensors.values()) == 260_032
    assert "lm_head.weight" not in tensors  # tied to the embedding
    assert tensors["model.embed_tokens.weight"].shape == (512, 64)
    assert len([k for k in tensors if k.endswith("q_proj.weight")]) == 5


def test_transformers_loads_our_sharded_save(tmp_path):
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        pytest.skip("transformers not installed")
    tensors = load_model_tensors(bundled_model_path())
    save_model_tensors(tmp_path, tensors, max_shard_bytes=300_000)
    shutil.copy(os.path.join(bundled_model_path(), "config.json"), tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    state = model.state_dict()
    for k, a in tensors.items():
        assert torch.equal(state[k], torch.from_numpy(a)), k
