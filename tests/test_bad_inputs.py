"""The catalogue of bad inputs on the loading side (model folders, safetensors files, configs,
adapters, ``minipeft merge``): one test per case, each found by trying it as a user or an
attacker would. Every case must end in the project's own error class naming the file and the
key / field at fault (the CLI: exit 1 and one ``minipeft: error:`` line), never in a traceback,
a silently wrong load, an unbounded allocation, or a changed file."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import minipeft as mp
from minipeft.cli import main
from minipeft.errors import CheckpointError, ConfigError, InputError
from minipeft.io.safetensors import read_safetensors, write_safetensors
from minipeft.peft import LoraConfig, PeftModel, ReLoraConfig, get_peft_model
from tests.peft.helpers import randomize, tiny_model


# ----- fixtures and helpers ---------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    """A valid model folder (untied head, so lm_head.weight is stored)."""
    tiny_model(0, tie_word_embeddings=False).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def adapter_dir(tmp_path, model_dir):
    """A valid LoRA adapter for ``model_dir``."""
    peft = get_peft_model(mp.LlamaForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize(peft)
    peft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def raw_safetensors(header: dict, data: bytes) -> bytes:
    """A safetensors file with exactly this header and data section (no validation)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def edit_json(path: Path, change) -> Path:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))
    return path


def edit_tensors(path: Path, change) -> Path:
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    change(tensors)
    write_safetensors(path, tensors, {"format": "pt"})
    return path


def raises(kind, call, *needles) -> str:
    """Call, expect ``kind``, check the message names every needle; return the message."""
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in: {message}"
    return message


def load_model(folder):
    return lambda: mp.LlamaForCausalLM.from_pretrained(folder)


def load_adapter(model_dir, adapter_dir):
    return lambda: PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(model_dir), adapter_dir)


def cli_error(capsys, *argv) -> str:
    """Run the CLI in-process; it must exit 1 with exactly one ``minipeft: error:`` line."""
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert lines and lines[-1].startswith("minipeft: error: "), err
    assert sum(line.startswith("minipeft: error:") for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: "nothing already saved is changed"."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----- safetensors files whose tensors do not tile the data section exactly -----------------
# Each was loaded silently (exit 0, wrong weights). The reference package rejects all of them:
# sorted by offset, each tensor must begin where the previous one ended and the last must end
# where the data section ends.
def _two_tensors(a_offsets, b_offsets, data_bytes: int, data: bytes | None = None) -> bytes:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": a_offsets},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": b_offsets}}
    if data is None:
        data = np.arange(data_bytes // 4, dtype="<f4").tobytes() + b"\0" * (data_bytes % 4)
    return raw_safetensors(header, data)


def _inserted_bytes() -> bytes:
    """A valid file with 16 bytes inserted at the start of its data section (offsets unchanged)."""
    good = _two_tensors([0, 16], [16, 32], 32)
    n = struct.unpack("<Q", good[:8])[0]
    return good[:8 + n] + b"\x7f" * 16 + good[8 + n:]


LAYOUTS = {
    "aliased offsets": _two_tensors([0, 16], [0, 16], 16),
    "overlapping tensors": _two_tensors([0, 16], [8, 24], 24),
    "gap between tensors": _two_tensors([0, 16], [32, 48], 48),
    "16 inserted bytes": _inserted_bytes(),
    "trailing junk": _two_tensors([0, 16], [16, 32], 32) + b"junk-after-the-data",
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_safetensors_data_section_not_tiled_exactly_is_refused(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(LAYOUTS[case])
    raises(CheckpointError, lambda: read_safetensors(path), path)


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_reference_safetensors_rejects_the_same_files(tmp_path, case):
    """The oracle: the reference reader refuses every layout the catalogue refuses."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "bad.safetensors"
    path.write_bytes(LAYOUTS[case])
    with pytest.raises(Exception):  # noqa: B017 - the package raises its own SafetensorError
        safetensors_numpy.load_file(str(path))


def test_safetensors_error_names_the_key_at_fault(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(LAYOUTS["overlapping tensors"])
    raises(CheckpointError, lambda: read_safetensors(path), path, "'b'")


def test_model_file_with_aliased_tensors_is_refused(model_dir):
    """In a real model file: point one tensor at another's bytes (same shape)."""
    path = model_dir / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["model.layers.1.self_attn.q_proj.weight"]["data_offsets"] = \
        header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"]
    path.write_bytes(raw_safetensors(header, raw[8 + n:]))
    raises(CheckpointError, load_model(model_dir), path)


def test_safetensors_shape_with_a_huge_and_a_zero_dimension(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(raw_safetensors({"x": {"dtype": "F32", "shape": [0, 2 ** 64], "data_offsets": [0, 0]}}, b""))
    raises(CheckpointError, lambda: read_safetensors(path), path, "'x'", "shape")


def test_safetensors_header_nested_too_deeply(tmp_path):
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", 200_000) + b"[" * 200_000)
    raises(CheckpointError, lambda: read_safetensors(path), path, "nested")


def test_safetensors_unreadable(tmp_path, monkeypatch):
    """chmod cannot make a file unreadable for root, so the OS refusal is simulated."""
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"x": np.zeros(2, np.float32)})

    def refuse(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    real_open = open
    monkeypatch.setattr("builtins.open", refuse)
    raises(CheckpointError, lambda: read_safetensors(path), path, "Permission denied")


# ----- weights that are not finite floats ------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.uint8])
def test_integer_or_bool_model_weights_are_refused(model_dir, dtype):
    key = "model.layers.0.mlp.up_proj.weight"
    path = edit_tensors(model_dir / "model.safetensors", lambda t: t.update({key: t[key].astype(dtype)}))
    raises(CheckpointError, load_model(model_dir), path, key, "float")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_model_weights_are_refused(model_dir, bad):
    key = "model.layers.1.self_attn.o_proj.weight"
    path = edit_tensors(model_dir / "model.safetensors", lambda t: t[key].__setitem__((1, 2), bad))
    raises(CheckpointError, load_model(model_dir), path, key)


def test_non_finite_weight_in_a_shard_names_the_shard(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model(0).save_pretrained(folder, max_shard_bytes=20_000)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    key = sorted(read_safetensors(shard))[0]
    edit_tensors(shard, lambda t: t[key].reshape(-1).__setitem__(0, np.nan))
    raises(CheckpointError, load_model(folder), shard, key)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_adapter_tensor_is_refused(model_dir, adapter_dir, bad):
    path = adapter_dir / "adapter_model.safetensors"
    key = sorted(read_safetensors(path))[0]
    edit_tensors(path, lambda t: t[key].reshape(-1).__setitem__(0, bad))
    raises(CheckpointError, load_adapter(model_dir, adapter_dir), path, key)


def test_integer_adapter_tensor_is_refused(model_dir, adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    key = sorted(read_safetensors(path))[0]
    edit_tensors(path, lambda t: t.update({key: (t[key] * 100).astype(np.int16)}))
    raises(CheckpointError, load_adapter(model_dir, adapter_dir), path, key, "float")


# ----- config.json: values that gave NaN logits, tracebacks or "'>' not supported" ----------------
CONFIG_CASES = {
    "rope_theta zero": ({"rope_theta": 0}, "rope_theta"),
    "rope_theta negative": ({"rope_theta": -10000.0}, "rope_theta"),
    "rope_theta NaN": ({"rope_theta": math.nan}, "rope_theta"),
    "rope_theta Infinity": ({"rope_theta": math.inf}, "rope_theta"),
    "rope_theta a string": ({"rope_theta": "10000"}, "rope_theta"),
    "rms_norm_eps a string": ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    "rms_norm_eps NaN": ({"rms_norm_eps": math.nan}, "rms_norm_eps"),
    "rms_norm_eps Infinity": ({"rms_norm_eps": math.inf}, "rms_norm_eps"),
    "rope_scaling a string": ({"rope_scaling": "linear"}, "rope_scaling"),
    "rope_scaling a list": ({"rope_scaling": [2.0]}, "rope_scaling"),
    "scaling factor 0": ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    "scaling factor NaN": ({"rope_scaling": {"rope_type": "linear", "factor": math.nan}}, "factor"),
    "scaling factor a string": ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
    "llama3 equal freq factors": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 1.0,
                                                    "original_max_position_embeddings": 32}}, "high_freq_factor"),
    "llama3 original length 0": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 0}},
                                 "original_max_position_embeddings"),
    "rope_parameters a list": ({"rope_parameters": [10000.0]}, "rope_parameters"),
    "tie_word_embeddings a string": ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_field_names_file_and_field(model_dir, case):
    change, field = CONFIG_CASES[case]
    path = edit_json(model_dir / "config.json", lambda c: c.update(change))
    raises(ConfigError, load_model(model_dir), path, field)


def test_config_not_utf8(model_dir):
    path = model_dir / "config.json"
    path.write_bytes(b'{"vocab_size": "\xff\xfe"}')
    raises(ConfigError, load_model(model_dir), path, "UTF-8")


def test_config_is_a_folder(model_dir):
    path = model_dir / "config.json"
    path.unlink()
    path.mkdir()
    raises(ConfigError, load_model(model_dir), path, "folder")


def test_config_unreadable(model_dir, monkeypatch):
    path = model_dir / "config.json"
    real = Path.read_bytes

    def refuse(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: refuse(self).decode())
    raises(ConfigError, load_model(model_dir), path, "Permission denied")


def test_config_nested_too_deeply(model_dir):
    path = model_dir / "config.json"
    path.write_text('{"extra": ' + "[" * 100_000 + "]" * 100_000 + "}")
    raises(ConfigError, load_model(model_dir), path, "nested")


def test_config_error_on_the_command_line_is_one_line(capsys, model_dir):
    path = edit_json(model_dir / "config.json", lambda c: c.update(rms_norm_eps="1e-6"))
    line = cli_error(capsys, "generate", "--model", model_dir, "--max-new-tokens", "2")
    assert str(path) in line and "rms_norm_eps" in line


def test_bad_weights_on_the_command_line_are_one_line(capsys, model_dir):
    key = "model.norm.weight"
    path = edit_tensors(model_dir / "model.safetensors", lambda t: t[key].__setitem__(0, np.nan))
    line = cli_error(capsys, "generate", "--model", model_dir, "--max-new-tokens", "2")
    assert str(path) in line and key in line


def test_bad_adapter_config_on_the_command_line_is_one_line(capsys, model_dir, adapter_dir):
    path = edit_json(adapter_dir / "adapter_config.json", lambda c: c.update(lora_dropout=1.5))
    line = cli_error(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", adapter_dir.parent / "m")
    assert str(path) in line and "lora_dropout" in line


# ----- sizes: refused before anything that size is allocated ------------------------------------
@pytest.fixture
def no_layers_built(monkeypatch):
    """Fail the test if the loader starts building decoder layers (allocating)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a decoder layer was allocated before the size check")

    monkeypatch.setattr(mp.models.llama.LlamaDecoderLayer, "__init__", refuse)


@pytest.mark.parametrize("change", [{"num_hidden_layers": 10 ** 9}, {"hidden_size": 2 ** 40, "head_dim": 8},
                                    {"intermediate_size": 10 ** 12}, {"vocab_size": 10 ** 12}])
def test_config_larger_than_its_weights_is_refused_before_allocating(model_dir, change, no_layers_built):
    edit_json(model_dir / "config.json", lambda c: c.update(change))
    message = raises(CheckpointError, load_model(model_dir), model_dir / "config.json", "model.safetensors")
    assert "parameters" in message and "holds" in message


def test_adapter_rank_larger_than_its_file_is_refused_before_allocating(model_dir, adapter_dir, monkeypatch):
    from minipeft.peft.lowrank import lora

    def refuse(*args, **kwargs):
        raise AssertionError("an adapter layer was allocated before the size check")

    monkeypatch.setattr(lora.LoraLayer, "update_layer", refuse)
    path = edit_json(adapter_dir / "adapter_config.json", lambda c: c.update(r=10 ** 6))
    raises(CheckpointError, load_adapter(model_dir, adapter_dir), path, "r", "adapter_model.safetensors")


def test_prompt_longer_than_the_model_positions_is_refused():
    model = tiny_model(0)  # max_position_embeddings 64
    ids = np.zeros((1, model.config.max_position_embeddings + 1), dtype=np.int64)
    raises(InputError, lambda: model(ids), "max_position_embeddings", "65")


# ----- adapter_config.json: errors name the file ---------------------------------------------------
ADAPTER_CASES = {
    "r zero": ({"r": 0}, "'r'"),
    "r a string": ({"r": "8"}, "'r'"),
    "dropout 1.5": ({"lora_dropout": 1.5}, "lora_dropout"),
    "lora_alpha NaN": ({"lora_alpha": math.nan}, "lora_alpha"),
    "lora_alpha Infinity": ({"lora_alpha": math.inf}, "lora_alpha"),
    "alpha_pattern NaN": ({"alpha_pattern": {"q_proj": math.nan}}, "alpha_pattern"),
    "peft_type a list": ({"peft_type": ["LORA"]}, "peft_type"),
    "peft_type an object": ({"peft_type": {"LORA": 1}}, "peft_type"),
    "peft_type null": ({"peft_type": None}, "peft_type"),
    "target_modules invalid regex": ({"target_modules": "(q_proj"}, "target_modules"),
    "exclude_modules invalid regex": ({"exclude_modules": "[v_proj"}, "exclude_modules"),
    "rank_pattern invalid regex": ({"rank_pattern": {"(": 2}}, "rank_pattern"),
    "layers_pattern invalid regex": ({"layers_to_transform": [0], "layers_pattern": "(",
                                      "target_modules": ["q_proj"]}, "layers_pattern"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter_config_names_file_and_field(model_dir, adapter_dir, case):
    change, field = ADAPTER_CASES[case]
    path = edit_json(adapter_dir / "adapter_config.json", lambda c: c.update(change))
    raises(ConfigError, load_adapter(model_dir, adapter_dir), path, field)


def test_adapter_config_nested_too_deeply(model_dir, adapter_dir):
    path = adapter_dir / "adapter_config.json"
    path.write_text('{"peft_type": "LORA", "x": ' + "{\"a\": " * 50_000 + "1" + "}" * 50_000 + "}")
    raises(ConfigError, load_adapter(model_dir, adapter_dir), path, "nested")


def test_relora_adapter_without_its_merged_updates_is_refused(tmp_path, model_dir):
    base = mp.LlamaForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(base, ReLoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, reset_every=1,
                                             target_modules=["q_proj"]))
    randomize(peft)
    peft.on_step_end(1)  # a restart: W now holds s·B·A
    peft.save_pretrained(tmp_path / "relora")
    (tmp_path / "relora" / "relora_merged.safetensors").unlink()
    raises(CheckpointError, load_adapter(model_dir, tmp_path / "relora"), "relora_merged.safetensors")


# ----- minipeft merge: nothing already saved is changed ----------------------------------------
def test_merge_out_same_as_model_is_refused_before_writing(capsys, model_dir, adapter_dir):
    before = snapshot(model_dir)
    line = cli_error(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", model_dir)
    assert "--out" in line and "--model" in line
    assert snapshot(model_dir) == before


def test_merge_out_same_as_model_by_another_spelling(capsys, tmp_path, model_dir, adapter_dir):
    link = tmp_path / "link-to-model"
    link.symlink_to(model_dir, target_is_directory=True)
    before = snapshot(model_dir)
    cli_error(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", f"{link}/./")
    assert snapshot(model_dir) == before


def test_merge_out_is_the_adapter_folder(capsys, model_dir, adapter_dir):
    before = snapshot(adapter_dir)
    line = cli_error(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", adapter_dir)
    assert "--adapter" in line
    assert snapshot(adapter_dir) == before


def test_merge_out_is_a_file(capsys, tmp_path, model_dir, adapter_dir):
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    line = cli_error(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", out)
    assert str(out) in line and "--out" in line
    assert out.read_text() == "keep me"


def test_merge_out_inside_a_file(capsys, tmp_path, model_dir, adapter_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    line = cli_error(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", blocker / "merged")
    assert str(blocker) in line
    assert blocker.read_text() == "keep me"


def test_merge_out_unwritable(capsys, tmp_path, model_dir, adapter_dir, monkeypatch):
    """Root may write anywhere, so the OS's answer to "may I write here?" is simulated."""
    parent = tmp_path / "read-only"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real_access(p, mode, **kw))
    line = cli_error(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", parent / "merged")
    assert str(parent) in line and "writ" in line
    assert not (parent / "merged").exists()


def test_merge_of_nan_adapter_writes_nothing(capsys, tmp_path, model_dir, adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    key = sorted(read_safetensors(path))[0]
    edit_tensors(path, lambda t: t[key].reshape(-1).__setitem__(0, np.nan))
    line = cli_error(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", tmp_path / "merged")
    assert key in line
    assert not (tmp_path / "merged").exists()
