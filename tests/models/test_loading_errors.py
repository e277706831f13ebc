"""Loading HF folders: every kind of bad folder gets a CheckpointError / ConfigError that
names the file and key and says what was expected; bad model inputs get an InputError;
config.json is read in both transformers 4 and 5 spellings; tied heads are handled."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

import minipeft as mp
from minipeft.errors import CheckpointError, ConfigError, InputError
from minipeft.io.safetensors import read_safetensors, write_safetensors

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def folder(tmp_path, random_model):
    """A valid model folder written by minipeft (untied, so it stores lm_head.weight)."""
    random_model(0, tie_word_embeddings=False).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def edit_weights(folder, change):
    path = folder / "model.safetensors"
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    change(tensors)
    write_safetensors(path, tensors, {"format": "pt"})
    return path


def edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    return path


def load_error(folder, kind):
    with pytest.raises(kind) as info:
        mp.LlamaForCausalLM.from_pretrained(folder)
    return str(info.value)


def assert_names(message, *needles):
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in: {message}"


# ----- weights that do not fit the config -------------------------------------------------
def test_missing_tensor(folder):
    path = edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = load_error(folder, CheckpointError)
    assert_names(message, path, folder / "config.json", "missing", "model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(folder):
    path = edit_weights(folder, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias",
                                                        np.zeros(32, np.float32)))
    message = load_error(folder, CheckpointError)
    assert_names(message, path, "unexpected", "model.layers.0.self_attn.q_proj.bias")


def test_shape_disagrees_with_config(folder):
    edit_config(folder, lambda c: c.__setitem__("intermediate_size", 50))
    message = load_error(folder, CheckpointError)
    assert_names(message, folder / "model.safetensors", folder / "config.json",
                 "model.layers.0.mlp.gate_proj.weight", "expected shape (50, 32)", "found (48, 32)")


def test_wrong_shape_in_weights(folder):
    edit_weights(folder, lambda t: t.__setitem__("model.norm.weight", np.ones(31, np.float32)))
    message = load_error(folder, CheckpointError)
    assert_names(message, "model.norm.weight", "expected shape (32,)", "found (31,)")


def test_truncated_weights_file(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    message = load_error(folder, CheckpointError)
    assert_names(message, path, "truncated")
    assert re.search(r"tensor '[\w.]+'", message)  # names the tensor cut short


def test_weights_file_shorter_than_its_header(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    assert_names(load_error(folder, CheckpointError), path, "header")


def test_unsupported_dtype_in_file(folder):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["dtype"] = "F8_E4M3"  # 1 byte per value: the span no longer fits,
    # so make it consistent to reach the dtype check itself
    begin, _ = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [begin, begin + 32]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    message = load_error(folder, CheckpointError)
    assert_names(message, path, "model.norm.weight", "F8_E4M3", "F32", "BF16")


def test_sharded_folder_with_missing_shard(tmp_path, random_model):
    random_model(0).save_pretrained(tmp_path, max_shard_bytes=10_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    assert_names(load_error(tmp_path, CheckpointError), shard, "model.safetensors.index.json",
                 "does not exist")


def test_no_weights_at_all(folder):
    (folder / "model.safetensors").unlink()
    assert_names(load_error(folder, CheckpointError), folder, "model.safetensors")


def test_not_a_folder(tmp_path):
    assert_names(load_error(tmp_path / "nowhere", CheckpointError), tmp_path / "nowhere")


# ----- config.json ------------------------------------------------------------------------
def test_config_invalid_json_names_line_and_column(folder):
    (folder / "config.json").write_text('{\n  "vocab_size": 96,\n  "hidden_size": 32,,\n}\n')
    message = load_error(folder, ConfigError)
    assert_names(message, folder / "config.json", "line 3", "column 21")


def test_config_missing(folder):
    (folder / "config.json").unlink()
    assert_names(load_error(folder, ConfigError), folder / "config.json")


@pytest.mark.parametrize("change,needles", [
    (lambda c: c.__setitem__("model_type", "gpt2"), ["model_type", "gpt2", "llama", "qwen2"]),
    (lambda c: c.__setitem__("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
     ["rope_scaling", "yarn", "llama3", "linear"]),
    (lambda c: c.__setitem__("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     ["yarn", "llama3"]),
    (lambda c: c.__setitem__("num_key_value_heads", 3),
     ["num_attention_heads", "(4)", "num_key_value_heads", "(3)", "multiple"]),
    (lambda c: c.__setitem__("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
     ["low_freq_factor"]),
    (lambda c: c.__setitem__("hidden_act", "gelu"), ["hidden_act", "gelu", "silu"]),
    (lambda c: c.__setitem__("hidden_size", 0), ["hidden_size", "positive"]),
    (lambda c: c.pop("vocab_size"), ["vocab_size"]),
    (lambda c: c.update(model_type="mistral", sliding_window=4096), ["sliding_window"]),
], ids=["gpt2", "yarn", "yarn-v5", "kv-heads", "llama3-incomplete", "gelu", "zero-size",
        "no-vocab", "sliding-window"])
def test_config_errors_name_file_and_field(folder, change, needles):
    edit_config(folder, change)
    message = load_error(folder, ConfigError)
    assert_names(message, folder / "config.json", *needles)


def test_errors_are_value_errors_and_minipeft_errors():
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, mp.MiniPeftError)
    assert issubclass(ConfigError, ValueError) and issubclass(InputError, mp.MiniPeftError)


# ----- bad model inputs -------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", [96, 1000, -1])
def test_token_id_out_of_range(random_model, bad_id):
    model = random_model(0)
    with pytest.raises(InputError) as info:
        model(np.array([[1, 2, bad_id, 3]]))
    assert_names(str(info.value), str(bad_id), "96")


@pytest.mark.parametrize("ids", [np.array([1, 2, 3]), np.zeros((1, 2, 3), np.int64), np.array(5)])
def test_input_ids_of_wrong_ndim(random_model, ids):
    with pytest.raises(InputError, match=r"input_ids must have shape \(batch, length\)"):
        random_model(0)(ids)


def test_input_ids_of_float_dtype(random_model):
    with pytest.raises(InputError, match="integers"):
        random_model(0)(np.array([[1.0, 2.0]]))


def test_labels_and_mask_checked(random_model):
    model = random_model(0)
    with pytest.raises(InputError, match="attention_mask has shape"):
        model(np.array([[1, 2, 3]]), attention_mask=np.ones((1, 2), np.int64))
    with pytest.raises(InputError, match="labels"):
        model(np.array([[1, 2, 3]]), labels=np.array([1, 2, 3]))


# ----- tied heads -------------------------------------------------------------------------
def test_tied_model_is_saved_without_lm_head(tmp_path, random_model):
    model = random_model(0, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    back = mp.LlamaForCausalLM.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = np.array([[1, 5, 9, 3]])
    np.testing.assert_array_equal(back(ids).logits.numpy(), model(ids).logits.numpy())


def test_tied_checkpoint_that_stores_lm_head_still_loads(tmp_path, random_model):
    model = random_model(0, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    embed = model.model.embed_tokens.weight.numpy()
    # some writers store the head too (a copy, or stale values transformers ignores)
    edit_weights(tmp_path, lambda t: t.__setitem__("lm_head.weight", embed + 1.0))
    back = mp.LlamaForCausalLM.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    np.testing.assert_array_equal(back.lm_head.weight.numpy(), embed)


def test_untied_checkpoint_without_lm_head_fails(folder):
    edit_weights(folder, lambda t: t.pop("lm_head.weight"))
    assert_names(load_error(folder, CheckpointError), "missing", "lm_head.weight")


def test_stored_inv_freq_buffers_are_ignored(folder):
    edit_weights(folder, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq",
                                                 np.ones(4, np.float32)))
    mp.LlamaForCausalLM.from_pretrained(folder)


# ----- LlamaConfig spellings --------------------------------------------------------------
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def test_config_reads_transformers4_and_transformers5_rope_spellings():
    v4 = mp.LlamaConfig.from_dict({**TINY, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    v5 = mp.LlamaConfig.from_dict({**TINY, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    assert v4 == v5
    assert v5.rope_theta == 500000.0 and v5.rope_type == "llama3"
    assert v5.rope_scaling["original_max_position_embeddings"] == 16
    # no scaling, either spelling
    plain4 = mp.LlamaConfig.from_dict({**TINY, "rope_theta": 1e6, "rope_scaling": None})
    plain5 = mp.LlamaConfig.from_dict({**TINY, "rope_parameters": {"rope_type": "default",
                                                                   "rope_theta": 1e6}})
    assert plain4 == plain5 and plain5.rope_scaling is None and plain5.rope_type == "default"
    # the old "type" key of transformers 4 rope_scaling
    linear = mp.LlamaConfig.from_dict({**TINY, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_type == "linear"


def test_rope_spellings_give_the_same_model(tmp_path, random_model):
    """A folder whose config.json uses the v4 spelling and one using v5 run identically."""
    model = random_model(4, rope_scaling=LLAMA3, rope_theta=5000.0)
    model.save_pretrained(tmp_path / "v4")
    shutil.copytree(tmp_path / "v4", tmp_path / "v5")

    def to_v5(c):
        c["rope_parameters"] = {**c.pop("rope_scaling"), "rope_theta": c.pop("rope_theta")}
    edit_config(tmp_path / "v5", to_v5)
    assert "rope_scaling" in json.loads((tmp_path / "v4" / "config.json").read_text())
    ids = np.arange(40).reshape(1, 40)
    a = mp.LlamaForCausalLM.from_pretrained(tmp_path / "v4")
    b = mp.LlamaForCausalLM.from_pretrained(tmp_path / "v5")
    assert a.config == b.config
    np.testing.assert_array_equal(a(ids).logits.numpy(), b(ids).logits.numpy())
    np.testing.assert_array_equal(a(ids).logits.numpy(), model(ids).logits.numpy())


def test_config_keeps_unknown_keys_and_round_trips():
    raw = {**TINY, "rope_theta": 1e4, "initializer_range": 0.02, "architectures": ["LlamaForCausalLM"]}
    config = mp.LlamaConfig.from_dict(raw)
    again = mp.LlamaConfig.from_dict(config.to_dict())
    assert again == config and again.extra["initializer_range"] == 0.02
    assert config.head_dim == 8 and config.num_key_value_groups == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 64
