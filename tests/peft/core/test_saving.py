"""saving.py and config.py: PEFT's on-disk layout, strict loading, forward-compatible configs."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from minipeft.errors import CheckpointError, ConfigError
from minipeft.io import read_safetensors, read_safetensors_header, write_safetensors
from minipeft.peft import LoraConfig, PeftModel, get_peft_model
from tests.peft.helpers import logits, randomize, tiny_model, token_ids

# The keys PEFT 0.21's LoraConfig writes (test_oracle_peft.py checks this against PEFT itself).
PEFT_LORA_KEYS = {
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path", "bias",
    "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
    "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config",
    "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size",
    "r", "rank_pattern", "revision", "target_modules", "target_parameters", "task_type",
    "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config"}
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def saved(tmp_path, config, name="default", **model):
    peft_model = get_peft_model(tiny_model(**model), config, adapter_name=name)
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    return peft_model


def test_config_file_is_peft_json(tmp_path):
    saved(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"], lora_dropout=0.1))
    text = (tmp_path / "adapter_config.json").read_text()
    raw = json.loads(text)
    assert text == json.dumps(raw, indent=2, sort_keys=True)
    assert set(raw) == PEFT_LORA_KEYS
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["inference_mode"] is True
    assert raw["target_modules"] == ["q_proj", "v_proj"] and raw["r"] == 4 and raw["lora_dropout"] == 0.1


def test_tensor_keys_are_peft_keys_without_the_adapter_name(tmp_path):
    saved(tmp_path, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
          name="mine")
    folder = tmp_path / "mine"  # adapters other than "default" go to a sub-folder, as PEFT
    _, metadata = read_safetensors_header(folder / "adapter_model.safetensors")
    assert metadata == {"format": "pt"}
    tensors = read_safetensors(folder / "adapter_model.safetensors")
    assert tensors[f"{Q0}.lora_A.weight"].shape == (2, 32) and tensors[f"{Q0}.lora_B.weight"].shape == (32, 2)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (2, 96)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 2)
    assert tensors["base_model.model.lm_head.weight"].shape == (96, 32)  # the modules_to_save copy
    assert "base_model.model.model.embed_tokens.base_layer.weight" in tensors  # PEFT's save_embedding_layers
    assert not any("mine" in k for k in tensors)


def test_embedding_layers_are_saved_only_when_targeted_or_asked(tmp_path):
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        saved(tmp_path / "a", LoraConfig(target_modules=["embed_tokens"]))
    peft_model = saved(tmp_path / "b", LoraConfig(target_modules=["q_proj"]))
    assert not any("embed" in k for k in read_safetensors(tmp_path / "b" / "adapter_model.safetensors"))
    peft_model.save_pretrained(tmp_path / "c", save_embedding_layers=True)
    keys = set(read_safetensors(tmp_path / "c" / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    peft_model.save_pretrained(tmp_path / "d", save_embedding_layers=False)


@pytest.mark.parametrize("bias, expected", [
    ("lora_only", {f"{Q0}.base_layer.bias"}),
    ("all", {f"{Q0}.base_layer.bias"} | {f"base_model.model.model.layers.{i}.self_attn.{p}.bias"
                                          for i in (0, 1) for p in ("k_proj", "v_proj", "o_proj")}
     | {"base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias"})])
def test_trained_biases_are_saved_under_their_model_names(tmp_path, bias, expected):
    saved(tmp_path, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0] if bias == "lora_only" else None,
                               bias=bias), attention_bias=True)
    keys = {k for k in read_safetensors(tmp_path / "adapter_model.safetensors") if k.endswith("bias")}
    assert keys == expected


def test_loading_onto_a_base_it_does_not_fit_names_the_key_and_both_shapes(tmp_path):
    saved(tmp_path, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    other = tiny_model(hidden_size=48, num_attention_heads=4, intermediate_size=32)
    with pytest.raises(CheckpointError, match=rf"'{Q0}.lora_A.weight' has shape \(4, 32\), "
                                              r"the model expects \(4, 48\)"):
        PeftModel.from_pretrained(other, tmp_path)


def test_missing_and_unexpected_tensors_are_reported_and_nothing_changes(tmp_path):
    saved(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))
    path = tmp_path / "adapter_model.safetensors"
    tensors = dict(read_safetensors(path))
    tensors.pop(f"{Q0}.lora_B.weight")
    tensors["base_model.model.something.else"] = np.zeros(3, np.float32)
    write_safetensors(path, tensors)
    with pytest.raises(CheckpointError, match=r"missing keys: .*q_proj.lora_B.weight \| unexpected keys: .*else"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)


def test_missing_files_and_bad_configs_get_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json' does not exist"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "VERA"}')
    with pytest.raises(ConfigError, match="unknown peft_type 'VERA'"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "target_modules": ["q_proj"]}')
    with pytest.raises(CheckpointError, match="adapter_model.safetensors' does not exist"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)


def test_config_round_trips_and_drops_unknown_keys_with_a_warning():
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], rank_pattern={"q_proj": 2},
                        modules_to_save=["lm_head"], use_dora=True, layers_to_transform=[0, 1])
    raw = json.loads(json.dumps(config.to_dict()))
    assert LoraConfig.from_dict(raw) == config
    with pytest.warns(UserWarning, match=r"\['from_the_future'\]"):
        assert LoraConfig.from_dict({**raw, "from_the_future": 1}) == config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig.from_dict(raw)  # PEFT's own keys at their defaults raise no warning


def test_peft_features_minipeft_lacks_are_refused_by_name():
    raw = LoraConfig().to_dict()
    for key, value in [("fan_in_fan_out", True), ("lora_bias", True), ("layer_replication", [[0, 1]]),
                       ("use_qalora", True), ("eva_config", {"rho": 2.0})]:
        with pytest.raises(ConfigError, match=key):
            LoraConfig.from_dict({**raw, key: value})
    assert LoraConfig.from_dict({**raw, "loftq_config": None, "megatron_core": "other"}) == LoraConfig()


def test_save_and_load_of_several_adapters(tmp_path):
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.add_adapter("second", LoraConfig(r=3, target_modules=["v_proj"]))
    randomize(peft_model)
    peft_model.eval().save_pretrained(tmp_path)
    expected = logits(peft_model, token_ids())
    peft_model.set_adapter("second")
    expected_second = logits(peft_model, token_ids())
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    np.testing.assert_array_equal(logits(loaded, token_ids()), expected)
    loaded.set_adapter("second")
    np.testing.assert_array_equal(logits(loaded, token_ids()), expected_second)


def test_base_model_name_is_recorded(tmp_path):
    import minipeft as mp

    path = mp.bundled_model_path()
    get_peft_model(mp.LlamaForCausalLM.from_pretrained(path), LoraConfig()).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == path


def test_a_pickle_adapter_is_refused_with_how_to_resave_it(tmp_path):
    """PEFT's old ``adapter_model.bin`` is a pickle: refused by name, never unpickled, nothing loaded."""
    get_peft_model(tiny_model(), LoraConfig(r=2)).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin' is a pickle file.*save_pretrained"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)
