"""AdapterFusion: over one adapter with W_V = I it is that adapter; the regulariser by hand; only the
fusion trains; temperature; config validation; files; the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.autograd import Tensor, no_grad
from minipeft.errors import CheckpointError, ConfigError
from minipeft.peft import AdapterFusionConfig, DoubleSeqBnConfig, PeftModel, SeqBnConfig, get_peft_model
from tests.peft.helpers import logits, randomize, tiny_model, token_ids


def saved_adapter(folder, config, seed=0):
    peft_model = get_peft_model(tiny_model(0), config, seed=seed)
    randomize(peft_model, seed=seed, scale=0.5)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def fusion_layers(peft_model):
    return [h.adapter_fusion_layer["default"] for _, h in peft_model.named_adapter_modules()
            if "default" in h.adapter_fusion_layer]


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), houlsby=st.booleans())
def test_fusion_over_one_adapter_with_identity_value_is_that_adapter(tmp_path_factory, seed, houlsby):
    folder = tmp_path_factory.mktemp("one")
    adapter = saved_adapter(folder, DoubleSeqBnConfig() if houlsby else SeqBnConfig(), seed)
    fused = get_peft_model(tiny_model(0), AdapterFusionConfig(adapters=[folder]), seed=seed)
    randomize(fused, seed)  # random Q and K: with one adapter the softmax is 1 anyway
    for layer in fusion_layers(fused):
        layer.value.weight.data = np.eye(32, dtype=np.float32)
    np.testing.assert_array_equal(logits(fused.eval(), token_ids(seed)), logits(adapter, token_ids(seed)))


def test_two_adapters_by_hand():
    """h + f + Σ p_n V U_n at one join, in float64 NumPy (no 1/√d; softmax over the adapters)."""
    config = AdapterFusionConfig(adapters=(SeqBnConfig(), SeqBnConfig(non_linearity="swish")))
    peft_model = get_peft_model(tiny_model(0, dtype=np.float64), config)
    randomize(peft_model, scale=0.3)
    layer = fusion_layers(peft_model)[0]
    rng = np.random.default_rng(1)
    f, h = rng.normal(size=(2, 4, 32)), rng.normal(size=(2, 4, 32))
    z = f + h
    with no_grad():
        U = np.stack([m.up(Tensor(z)).numpy() for m in layer.adapters.values()], axis=2)  # (B, T, N, d)
        got = layer.join(Tensor(f), Tensor(h)).numpy()
    Q = z @ layer.query.weight.data.T + layer.query.bias.data
    K = U @ layer.key.weight.data.T + layer.key.bias.data
    V = U @ layer.value.weight.data.T
    s = np.einsum("btd,btnd->btn", Q, K)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("btn,btnd->btd", p, V) + f + h, rtol=1e-9, atol=1e-9)


def test_only_the_fusion_trains_and_the_regularizer_is_by_hand(tmp_path):
    saved_adapter(tmp_path / "a", SeqBnConfig(), 1)
    saved_adapter(tmp_path / "b", SeqBnConfig(reduction_factor=8), 2)
    peft_model = get_peft_model(tiny_model(0), AdapterFusionConfig(adapters=[tmp_path / "a", tmp_path / "b"]))
    layers = fusion_layers(peft_model)
    assert list(layers[0].adapters) == ["a", "b"]  # both folders say "default": their folder names instead
    V = layers[0].value.weight.data
    assert np.all(np.diag(V) == 1) and np.all(V[~np.eye(32, dtype=bool)] == np.float32(1e-6))
    randomize(peft_model)
    expected = 0.01 * sum(float(((np.eye(32) - l.value.weight.data.astype(np.float64)) ** 2).sum()) for l in layers)
    np.testing.assert_allclose(peft_model.regularizer().item(), expected, rtol=1e-5)
    peft_model(token_ids(), labels=token_ids()).loss.backward()
    for layer in layers:
        assert all(p.grad is None and not p.requires_grad for m in layer.adapters.values() for p in m.state().values())
        assert all(p.grad is not None for p in layer.trainable_state().values())
    off = get_peft_model(tiny_model(0), AdapterFusionConfig(adapters=[tmp_path / "a"], regularization=False))
    assert off.regularizer() is None


def test_member_names_come_from_the_folders(tmp_path):
    saved_adapter(tmp_path / "a", SeqBnConfig())
    with pytest.raises(ConfigError, match="distinct"):  # the same folder twice: no distinct name
        get_peft_model(tiny_model(0), AdapterFusionConfig(adapters=[tmp_path / "a", tmp_path / "a"]))
    peft_model = get_peft_model(tiny_model(0), AdapterFusionConfig(adapters=[tmp_path / "a", tmp_path / "a"],
                                                                   adapter_names=["x", "y"]))
    assert list(fusion_layers(peft_model)[0].adapters) == ["x", "y"]


def test_temperature_anneals_in_training_only():
    peft_model = get_peft_model(tiny_model(0), AdapterFusionConfig(adapters=(SeqBnConfig(),), temperature=True))
    layer = fusion_layers(peft_model)[0]
    peft_model.eval()
    logits(peft_model, token_ids())
    assert layer.T == 50.0  # the library would be at 49.95 here
    peft_model.train()
    logits(peft_model, token_ids())
    logits(peft_model, token_ids())
    assert layer.T == pytest.approx(49.9)


@pytest.mark.parametrize("field,value", [("adapters", ()), ("adapters", [3]), ("adapter_names", ["a", "b"]),
                                         ("adapter_names", ["a,b"]), ("residual_before", True),
                                         ("value_before_softmax", False), ("dropout_prob", 1.5),
                                         ("temperature", "yes")])
def test_config_validation(field, value):
    kwargs = {"adapters": (SeqBnConfig(),), field: value}
    with pytest.raises(ConfigError, match=field):
        AdapterFusionConfig(**kwargs)


def test_files_and_missing_members(tmp_path):
    config = AdapterFusionConfig(adapters=(SeqBnConfig(), DoubleSeqBnConfig(non_linearity="relu")),
                                 adapter_names=("a", "b"))
    with pytest.raises(ConfigError, match="attention_adapters"):  # b sits after attention too, a does not
        get_peft_model(tiny_model(0), config)
    config = config.replace(adapters=(SeqBnConfig(), SeqBnConfig(non_linearity="relu")))
    peft_model = get_peft_model(tiny_model(0), config)
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "adapter_fusion_config.json", "b",
                                                          "model_adapter_fusion.safetensors"]
    raw = json.loads((tmp_path / "adapter_fusion_config.json").read_text())
    assert raw["name"] == "a,b" and raw["adapter_names"] == ["a", "b"] and raw["config"] == {
        "dropout_prob": None, "key": True, "query": True, "query_before_ln": False, "regularization": True,
        "residual_before": False, "temperature": False, "value": True, "value_before_softmax": True,
        "value_initialized": True}
    loaded = PeftModel.from_pretrained(tiny_model(0), tmp_path)
    np.testing.assert_array_equal(logits(loaded, token_ids()), logits(peft_model.eval(), token_ids()))
    (tmp_path / "b" / "adapter_config.json").rename(tmp_path / "b" / "x.json")
    with pytest.raises(CheckpointError, match="save_adapter"):
        PeftModel.from_pretrained(tiny_model(0), tmp_path)


def test_cli_fusion_trains_generates_and_refuses_merge(capsys, tmp_path):
    from tests.test_cli_train import run, small_data  # noqa: PLC0415

    data = small_data(tmp_path)
    steps = ("--steps", 2, "--batch-size", 2, "--seq-len", 64, "--eval-every", 2, "--save-every", 2, "--warmup", 0)
    for name in ("a", "b"):
        code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / name, "--method", "pfeiffer",
                           "--seed", 1 if name == "a" else 2, *steps)
        assert code == 0, err
    out = tmp_path / "fusion"  # both runs saved their adapter as "default": fused as "a" and "b"
    code, stdout, err = run(capsys, "train", "--data", data, "--out", out, "--method", "fusion",
                            "--fusion-adapters", tmp_path / "a", tmp_path / "b", *steps)
    assert code == 0, err
    assert (out / "adapter_fusion_config.json").exists() and (out / "a" / "adapter.safetensors").exists()
    code, stdout, err = run(capsys, "generate", "--adapter", out, "--prompt", "Once", "--max-new-tokens", 4)
    assert code == 0 and stdout.startswith("Once")
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--out", tmp_path / "merged")
    assert code == 1 and "cannot be merged" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run(capsys, "train", "--data", data, "--out", tmp_path / "x", "--method", "fusion", *steps)
    assert code == 1 and "--fusion-adapters" in err
