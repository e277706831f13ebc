"""Prefix tuning's promises: a prefix that is the base model's own KV cache of a text T gives the
logits of T + x; KV-cache generation equals recomputation; a left-padded row decodes as alone;
PEFT's sizes and init; PEFT's file (the final table only) and the projection MLP file; the
command line (train, generate --adapter, merge refused). The shared contract (tests/peft/
test_contract.py) covers gradients, counts, the refused merge and save / load for both rows.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.autograd import no_grad
from minipeft.errors import CheckpointError, ConfigError
from minipeft.io.safetensors import read_safetensors, write_safetensors
from minipeft.models.kv_cache import KVCache
from minipeft.peft import PeftModel, get_peft_model
from minipeft.peft.additive.prefix_tuning import PROJECTION_FILE, PrefixTuningConfig, prefix_key_values
from tests.peft.helpers import TINY, logits, randomize, tiny_model, token_ids

TABLE = PrefixTuningConfig(num_virtual_tokens=3)
PROJECTION = PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=12)


def make(config, seed=0, **overrides):
    model = get_peft_model(tiny_model(seed, **overrides), config, seed=seed)
    randomize(model, seed)
    return model.eval()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), prefix=st.integers(1, 5), length=st.integers(1, 6),
       kv_heads=st.sampled_from([1, 2, 4]))
def test_a_prefix_equal_to_the_cache_of_a_text_continues_that_text(seed, prefix, length, kv_heads):
    """K, V of layer l := the base model's cached keys / values of text T (P tokens): the adapted
    model on x gives the base model's logits of T + x at the x positions."""
    rng = np.random.default_rng(seed)
    text, x = rng.integers(0, TINY["vocab_size"], (1, prefix)), rng.integers(0, TINY["vocab_size"], (2, length))
    base = tiny_model(seed, num_key_value_heads=kv_heads)
    cache = KVCache(TINY["num_hidden_layers"])
    with no_grad():
        base(text, cache=cache)
        expected = base(np.concatenate([np.repeat(text, 2, axis=0), x], axis=1)).logits.numpy()[:, prefix:]
    peft_model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=prefix)).eval()
    kv = np.stack([a[0, :, :prefix] for pair in zip(cache.keys, cache.values) for a in pair])  # (2L, Hkv, P, Dh)
    table = peft_model.base_model.model.prefix_encoder.prompt_encoder["default"].embedding.weight
    table.data = kv.transpose(2, 0, 1, 3).reshape(prefix, -1)  # inverse of PEFT's view + permute
    got = logits(peft_model, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_key_values_are_the_table_viewed_and_split_in_pairs():
    peft_model = make(TABLE)
    config = peft_model.peft_config["default"]
    L, H, P, D = config.num_layers, config.num_attention_heads, 3, config.token_dim
    table = peft_model.base_model.model.prefix_encoder.prompt_encoder["default"].embedding.weight.numpy()
    pairs = prefix_key_values(peft_model, "default", 2)
    assert len(pairs) == L
    for layer, (k, v) in enumerate(pairs):
        assert k.shape == v.shape == (2, H, P, D // H)
        view = table.reshape(P, 2 * L, H, D // H)
        np.testing.assert_array_equal(k.numpy()[1], view[:, 2 * layer].transpose(1, 0, 2))
        np.testing.assert_array_equal(v.numpy()[0], view[:, 2 * layer + 1].transpose(1, 0, 2))


@pytest.mark.parametrize("config", [TABLE, PROJECTION], ids=["table", "projection"])
def test_kv_cache_generation_equals_recomputation(config):
    peft_model = make(config)
    ids = token_ids(4, batch=2, length=5)
    cached = peft_model.generate(ids, max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(peft_model.generate(ids, max_new_tokens=8, eos_token_id=[], use_cache=False),
                                  cached)
    with peft_model.disable_adapter():  # the prefix changes what is generated
        assert not np.array_equal(peft_model.generate(ids, max_new_tokens=8, eos_token_id=[]), cached)


@pytest.mark.parametrize("config", [TABLE, PROJECTION], ids=["table", "projection"])
def test_a_left_padded_row_is_the_row_alone(config):
    peft_model = make(config)
    short, long = token_ids(6, batch=1, length=3), token_ids(7, batch=1, length=6)
    batch = np.concatenate([np.concatenate([np.zeros((1, 3), np.int64), short], axis=1), long])
    mask = np.array([[0, 0, 0, 1, 1, 1], [1] * 6])
    together = peft_model.generate(batch, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(together[0, 3:], peft_model.generate(short, max_new_tokens=6, eos_token_id=[])[0])
    np.testing.assert_array_equal(together[1], peft_model.generate(long, max_new_tokens=6, eos_token_id=[])[0])
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # the forward too, given the real tokens' positions
    padded = logits(peft_model, batch, attention_mask=mask, position_ids=positions)
    np.testing.assert_allclose(padded[0, 3:], logits(peft_model, short)[0], rtol=1e-5, atol=1e-5)


def test_sizes_are_filled_in_from_the_model_as_peft_does():
    peft_model = get_peft_model(tiny_model(), PrefixTuningConfig(num_virtual_tokens=4))
    config = peft_model.peft_config["default"]  # TINY: head_dim 8, 2 key/value heads of 4, 2 layers
    assert (config.num_layers, config.token_dim, config.num_attention_heads) == (2, 16, 2)
    assert config.encoder_hidden_size == 16 and config.num_transformer_submodules == 1
    written = config.to_dict()
    assert written["peft_type"] == "PREFIX_TUNING" and written["modules_to_save"] is None


@pytest.mark.parametrize(("field", "value"), [("num_virtual_tokens", None), ("num_virtual_tokens", 0),
                                              ("token_dim", -1), ("num_transformer_submodules", 2),
                                              ("init_weights", "normal"), ("task_type", None)])
def test_bad_config_fields_are_named(field, value):
    kwargs = {"num_virtual_tokens": 2, field: value}
    with pytest.raises(ConfigError, match=field):
        PrefixTuningConfig(**kwargs)


def test_sizes_that_do_not_fit_the_model_are_refused():
    with pytest.raises(ConfigError, match="token_dim"):
        get_peft_model(tiny_model(), PrefixTuningConfig(num_virtual_tokens=2, token_dim=32))  # hidden, not Dh·Hkv
    with pytest.raises(ConfigError, match="num_layers"):
        get_peft_model(tiny_model(), PrefixTuningConfig(num_virtual_tokens=2, num_layers=3))


def test_init_is_torch_default_or_zero():
    state = get_peft_model(tiny_model(), PrefixTuningConfig(num_virtual_tokens=64)).base_model.model
    table = state.prefix_encoder.prompt_encoder["default"].embedding.weight.numpy()
    assert abs(table.mean()) < 0.05 and abs(table.std() - 1) < 0.05  # N(0, 1), nn.Embedding's default
    entry = get_peft_model(tiny_model(), PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True,
                                                            encoder_hidden_size=40)).base_model.model
    first, _, second = entry.prefix_encoder.prompt_encoder["default"].transform
    for layer in (first, second):  # nn.Linear's defaults: weight and bias both U(±1/√in)
        bound = 1 / math.sqrt(layer.in_features)
        for p in (layer.weight.numpy(), layer.bias.numpy()):
            assert np.abs(p).max() <= bound and np.abs(p).max() > 0.8 * bound
    zero = get_peft_model(tiny_model(), PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"))
    assert not zero.base_model.model.prefix_encoder.prompt_encoder["default"].embedding.weight.numpy().any()


def test_files_hold_the_final_table_and_the_projection_mlp_beside_it(tmp_path):
    peft_model = make(PROJECTION)
    peft_model.save_pretrained(tmp_path)
    table = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert list(table) == ["prompt_embeddings"] and table["prompt_embeddings"].shape == (3, 2 * 2 * 16)
    mlp = read_safetensors(tmp_path / PROJECTION_FILE)
    assert sorted(mlp) == ["embedding.weight", "transform.0.bias", "transform.0.weight", "transform.2.bias",
                           "transform.2.weight"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["prefix_projection"] is True
    # loaded for inference: the table itself (as PEFT), trainable: the MLP again, same outputs
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    entry = loaded.base_model.model.prefix_encoder.prompt_encoder["default"]
    assert not hasattr(entry, "transform")
    np.testing.assert_allclose(logits(loaded, token_ids()), logits(peft_model, token_ids()), rtol=1e-5, atol=1e-5)
    trainable = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    np.testing.assert_array_equal(logits(trainable.eval(), token_ids()), logits(peft_model, token_ids()))
    # an MLP file from another adapter is refused, naming it; nothing changed
    mlp["transform.2.bias"] = mlp["transform.2.bias"] + 1
    write_safetensors(tmp_path / PROJECTION_FILE, mlp)
    with pytest.raises(CheckpointError, match="different adapters"):
        PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    (tmp_path / PROJECTION_FILE).unlink()  # PEFT's files: no MLP to train further
    with pytest.raises(CheckpointError, match="is_trainable=False"):
        PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)


def test_an_adapter_for_another_model_is_refused(tmp_path):
    make(TABLE).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="token_dim"):
        PeftModel.from_pretrained(tiny_model(num_key_value_heads=4), tmp_path)


def test_adapters_switch_and_delete():
    peft_model = make(TABLE)
    peft_model.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=5))
    first = logits(peft_model, token_ids())
    peft_model.set_adapter("other")
    other = logits(peft_model, token_ids())
    assert not np.allclose(first, other)
    assert {g.name for g in peft_model.parameter_groups()} == {"prefix:other"}
    peft_model.delete_adapter("other")
    np.testing.assert_array_equal(logits(peft_model, token_ids()), first)


def test_training_lowers_the_loss():
    peft_model = get_peft_model(tiny_model(), PROJECTION).train()
    ids = token_ids(9, batch=2, length=8)
    params = [p for g in peft_model.parameter_groups() for p in g.params]
    losses = []
    for _ in range(5):
        peft_model.zero_grad()
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        for p in params:
            p.data = p.data - 0.05 * p.grad
    assert losses[-1] < losses[0]


def test_cli_trains_generates_and_refuses_merge(capsys, tmp_path):
    from tests.test_cli_train import run, small_data  # noqa: PLC0415

    data, out = small_data(tmp_path, n=8), tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", data, "--out", out, "--method", "prefix", "--prefix-tokens", 4,
                       "--steps", 2, "--batch-size", 2, "--seq-len", 64, "--eval-every", 2, "--warmup", 0)
    assert code == 0, err
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "PREFIX_TUNING" and written["num_virtual_tokens"] == 4
    code, stdout, err = run(capsys, "generate", "--adapter", out, "--prompt", "Once", "--max-new-tokens", 6)
    assert code == 0 and stdout.startswith("Once"), err
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--out", tmp_path / "merged")
    assert code == 1 and "cannot be merged" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()
