"""Bottleneck adapters (Houlsby / Pfeiffer): the equations against hand NumPy, identity when the
up-projection is zero, config validation, the adapters library's files, unload, and the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.autograd import Tensor, no_grad
from minipeft.errors import CheckpointError, ConfigError
from minipeft.io.safetensors import read_safetensors
from minipeft.peft import DoubleSeqBnConfig, LoraConfig, PeftModel, SeqBnConfig, get_peft_model
from minipeft.peft.additive import adapters_files
from minipeft.peft.additive.bottleneck_parts import ACTIVATIONS, GeluErf, activation
from tests.helpers.gradcheck import numerical_gradient
from tests.peft.helpers import logits, randomize, tiny_model, token_ids


def bottleneck_count(base, config) -> int:
    """The docstring's count: 2·m·d + m + d per adapter site (m = d // rf), sites per kept layer."""
    d, total = base.config.hidden_size, 0
    for i in range(base.config.num_hidden_layers):
        if i not in config.leave_out:
            m = config.bottleneck_size(d, i)
            total += len(config.locations()) * (2 * m * d + m + d)
    return total


# ----- hand NumPy -------------------------------------------------------------------------
def np_act(name, x):
    erf = np.vectorize(math.erf)
    return {"relu": lambda: np.maximum(x, 0), "swish": lambda: x / (1 + np.exp(-x)), "silu": lambda: x / (1 + np.exp(-x)),
            "gelu": lambda: 0.5 * x * (1 + erf(x / math.sqrt(2))),
            "gelu_new": lambda: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
            "gelu_pytorch_tanh": lambda: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
            "tanh": lambda: np.tanh(x), "sigmoid": lambda: 1 / (1 + np.exp(-x))}[name.lower()]()


def np_join(f, h, W, c):
    """The library's pre_forward / adapter / post_forward on LLaMA, by hand."""
    z = f + h if c.original_ln_before else f
    r = f if c.residual_before_ln else z
    B = c.scaling * (np_act(c.non_linearity, z @ W["adapter_down.0.weight"].T + W["adapter_down.0.bias"])
                     @ W["adapter_up.weight"].T + W["adapter_up.bias"])
    out = B + r
    return out + h if c.original_ln_after else out


@pytest.mark.parametrize("config", [SeqBnConfig(), DoubleSeqBnConfig(), SeqBnConfig(non_linearity="gelu", scaling=0.5),
                                    DoubleSeqBnConfig(non_linearity="gelu_new", scaling=2.0, reduction_factor=4),
                                    SeqBnConfig(residual_before_ln=False, original_ln_after=False, non_linearity="tanh")],
                         ids=["pfeiffer", "houlsby", "gelu", "gelu_new", "residual_after"])
def test_each_join_is_the_equation(config):
    """Pfeiffer: h + f + B(h + f); Houlsby: h + f + B(f) (at both joins), against NumPy in float64."""
    model = tiny_model(0, dtype=np.float64)
    peft_model = get_peft_model(model, config)
    randomize(peft_model, scale=0.5)
    rng = np.random.default_rng(4)
    f, h = rng.normal(size=(2, 5, 32)), rng.normal(size=(2, 5, 32))
    for layer in model.model.layers:
        for location in ("attention", "output"):
            holder = getattr(layer, f"{location}_adapters")
            assert (holder is not None) == (location in config.locations())
            if holder is None:
                continue
            W = {k: p.data for k, p in holder.adapter_state("default").items()}
            with no_grad():
                got = holder(Tensor(f), Tensor(h)).numpy()
            np.testing.assert_allclose(got, np_join(f, h, W, config), rtol=1e-6, atol=1e-6)


def test_pfeiffer_and_houlsby_differ_in_the_adapter_input():
    """The same weights give h + f + B(h + f) (Pfeiffer) vs h + f + B(f) (Houlsby's output adapter)."""
    rng = np.random.default_rng(0)
    f, h = rng.normal(size=(1, 3, 32)), rng.normal(size=(1, 3, 32))
    outs = []
    for config in (SeqBnConfig(non_linearity="swish"), DoubleSeqBnConfig()):
        peft_model = get_peft_model(tiny_model(0, dtype=np.float64), config, seed=7)
        holder = peft_model.base_model.model.model.layers[0].output_adapters
        with no_grad():
            outs.append(holder(Tensor(f), Tensor(h)).numpy())
    W = {k: p.data for k, p in holder.adapter_state("default").items()}
    np.testing.assert_allclose(outs[1], np_join(f, h, W, DoubleSeqBnConfig()), rtol=1e-7, atol=1e-9)
    assert not np.allclose(outs[0], outs[1])


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), houlsby=st.booleans())
def test_zero_up_projection_is_the_identity(seed, houlsby):
    base = tiny_model(seed)
    ids = token_ids(seed)
    expected = logits(base, ids)
    peft_model = get_peft_model(base, DoubleSeqBnConfig() if houlsby else SeqBnConfig(), seed=seed)
    randomize(peft_model, seed)
    assert not np.array_equal(logits(peft_model, ids), expected)
    for _, holder in peft_model.named_adapter_modules():
        holder.adapters["default"].adapter_up.weight.data[:] = 0
        holder.adapters["default"].adapter_up.bias.data[:] = 0
    np.testing.assert_array_equal(logits(peft_model, ids), expected)
    mam = get_peft_model(tiny_model(seed), SeqBnConfig(init_weights="mam_adapter"), seed=seed)
    np.testing.assert_array_equal(logits(mam, ids), expected)


def test_gelu_is_erf_gelu_and_its_gradient_matches_finite_differences():
    x = np.linspace(-6, 6, 241)
    np.testing.assert_allclose(GeluErf.apply(Tensor(x)).numpy(), np_act("gelu", x), atol=5e-7)
    for name in ACTIVATIONS:
        np.testing.assert_allclose(activation(name, Tensor(x)).numpy(), np_act(name, x), atol=5e-7, err_msg=name)
    t = Tensor(np.array([-2.0, -0.3, 0.1, 1.7]), requires_grad=True)
    mp.autograd.ops.sum(GeluErf.apply(t)).backward()
    numeric = numerical_gradient(lambda a: float(np_act("gelu", a[0]).sum()), [t.data.copy()], 0)
    np.testing.assert_allclose(t.grad, numeric, rtol=1e-6, atol=1e-6)


def test_inits():
    rng_model = get_peft_model(tiny_model(0, size=dict(vocab_size=16, hidden_size=512, intermediate_size=8,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=1, max_position_embeddings=8)),
                               SeqBnConfig(init_weights="houlsby"))
    state = rng_model.named_adapter_modules()[0][1].adapter_state("default")
    down = state["adapter_down.0.weight"].data
    assert down.shape == (32, 512) and np.abs(down).max() <= 0.02 and 0.007 < down.std() < 0.01
    assert not state["adapter_up.bias"].data.any()
    bert = get_peft_model(tiny_model(0), SeqBnConfig()).named_adapter_modules()[0][1].adapter_state("default")
    assert 0.01 < bert["adapter_up.weight"].data.std() < 0.03


@pytest.mark.parametrize("field,value", [("ln_before", True), ("ln_after", True), ("use_gating", True),
                                         ("is_parallel", True), ("phm_layer", True), ("stochastic_depth", 0.1),
                                         ("init_weights_seed", 3), ("inv_adapter", "nice"), ("cross_adapter", True),
                                         ("non_linearity", "mish"), ("init_weights", "lora"), ("scaling", "learned"),
                                         ("reduction_factor", 0), ("reduction_factor", {"1": 2}), ("dropout", 1.0),
                                         ("residual_before_ln", "post_add"), ("leave_out", [-1])])
def test_config_refuses_what_it_does_not_implement(field, value):
    with pytest.raises(ConfigError, match=field):
        SeqBnConfig(**{field: value})


def test_config_defaults_are_the_librarys():
    seq, double = SeqBnConfig(), DoubleSeqBnConfig()
    assert (seq.mh_adapter, seq.output_adapter, seq.non_linearity, seq.original_ln_before) == (False, True, "relu", True)
    assert (double.mh_adapter, double.non_linearity, double.original_ln_before) == (True, "swish", False)
    assert seq.reduction_factor == 16 and seq.init_weights == "bert" and seq.scaling == 1.0
    with pytest.raises(ConfigError, match="output_adapter"):
        SeqBnConfig(output_adapter=False)
    assert get_peft_model(tiny_model(0), SeqBnConfig()).named_adapter_modules()[0][1].adapters["default"] \
        .adapter_up.weight.shape == (32, 2)  # m = 32 // 16


SEQ_BN_CONFIG = {  # the library's seq_bn adapter_config.json "config" object, verbatim
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": True, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False}


def test_files_are_the_librarys(tmp_path):
    peft_model = get_peft_model(tiny_model(0), DoubleSeqBnConfig())
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["config"] == {**SEQ_BN_CONFIG, "mh_adapter": True, "non_linearity": "swish", "original_ln_before": False}
    assert {k: raw[k] for k in ("hidden_size", "model_class", "model_type", "name", "version")} == \
        {"hidden_size": 32, "model_class": "LlamaForCausalLM", "model_type": "llama", "name": "default",
         "version": "adapters.1.3.0"}
    keys = sorted(read_safetensors(tmp_path / "adapter.safetensors"))
    assert len(keys) == 2 * 2 * 4 and "model.layers.1.attention_adapters.adapters.default.adapter_down.0.weight" in keys
    assert adapters_files.config_object(SeqBnConfig()) == SEQ_BN_CONFIG


def test_reading_follows_the_library(tmp_path):
    """A config that omits fields takes BnConfig's defaults (original_ln_before false); a library name
    and bare-model keys (``layers.0...``) load; PEFT's layout is not this method's; pickles are refused."""
    peft_model = get_peft_model(tiny_model(0), SeqBnConfig())
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "a")
    tensors = read_safetensors(tmp_path / "a" / "adapter.safetensors")
    folder = tmp_path / "lib"
    folder.mkdir()
    mp.io.write_safetensors(folder / "adapter.safetensors",
                            {k.replace("model.", "", 1).replace(".default.", ".x."): v for k, v in tensors.items()})
    (folder / "adapter_config.json").write_text(json.dumps({"name": "x", "config": {
        "mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu"}}))
    config = adapters_files.read_bottleneck_config(folder)
    assert config.original_ln_before is False and config.original_ln_after is True
    loaded = PeftModel.from_pretrained(tiny_model(0), folder)
    assert not np.array_equal(logits(loaded, token_ids()), logits(peft_model.eval(), token_ids()))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["config"]["original_ln_before"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    np.testing.assert_array_equal(logits(PeftModel.from_pretrained(tiny_model(0), folder), token_ids()),
                                  logits(peft_model, token_ids()))
    lora = get_peft_model(tiny_model(0), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert adapters_files.read_bottleneck_config(tmp_path / "lora") is None
    (folder / "adapter.safetensors").rename(folder / "pytorch_adapter.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        PeftModel.from_pretrained(tiny_model(0), folder)


def test_wrong_shapes_and_prefix_tuning_folders_are_refused(tmp_path):
    get_peft_model(tiny_model(0), SeqBnConfig(reduction_factor=8)).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw["config"]["reduction_factor"] = 16
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="shape"):
        PeftModel.from_pretrained(tiny_model(0), tmp_path)
    raw["config"]["architecture"] = "prefix_tuning"
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="architecture"):
        PeftModel.from_pretrained(tiny_model(0), tmp_path)


def test_unload_removes_the_holders_and_one_adapter_runs_at_a_time():
    base = tiny_model(0)
    expected = logits(base, token_ids())
    peft_model = get_peft_model(base, DoubleSeqBnConfig())
    peft_model.add_adapter("other", SeqBnConfig())
    peft_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one"):
        logits(peft_model, token_ids())
    peft_model.set_adapter("other")
    with peft_model.disable_adapter():
        np.testing.assert_array_equal(logits(peft_model, token_ids()), expected)
    model = peft_model.unload()
    assert all(layer.output_adapters is None and layer.attention_adapters is None for layer in model.model.layers)
    np.testing.assert_array_equal(logits(model, token_ids()), expected)


def test_cli_train_houlsby_generate_and_merge_refused(capsys, tmp_path):
    from tests.test_cli_train import TRAIN, run, small_data  # noqa: PLC0415

    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", small_data(tmp_path), "--out", out, "--method", "houlsby",
                            "--reduction-factor", 8, "--adapter-init", "mam_adapter", *TRAIN[:1], 2, *TRAIN[2:])
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["config"]["mh_adapter"] is True
    code, stdout, err = run(capsys, "generate", "--adapter", out, "--prompt", "Once", "--max-new-tokens", 4)
    assert code == 0 and stdout.startswith("Once")
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--out", tmp_path / "merged")
    assert code == 1 and "cannot be merged" in err and len(err.strip().splitlines()) == 1
    assert not Path(tmp_path / "merged").exists()


def test_a_mixed_adapter_batch_runs_each_rows_adapter():
    peft_model = get_peft_model(tiny_model(0), SeqBnConfig())
    peft_model.add_adapter("h", DoubleSeqBnConfig())
    randomize(peft_model)
    peft_model.eval()
    ids = token_ids()
    mixed = logits(peft_model, ids, adapter_names=["h", "__base__"])
    peft_model.set_adapter("h")
    np.testing.assert_allclose(mixed[0], logits(peft_model, ids)[0], rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter():
        np.testing.assert_allclose(mixed[1], logits(peft_model, ids)[1], rtol=1e-5, atol=1e-5)
