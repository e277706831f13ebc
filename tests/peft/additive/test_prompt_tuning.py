"""Prompt tuning's promises: a prompt initialised from a text T gives, on x, the base model's logits
of T + x; the loss ignores the virtual positions; KV-cache generation equals recomputation; a
left-padded row decodes as alone; PEFT's inits (TEXT with the tokenizer's BOS, cut / repeated;
SAMPLE_VOCAB; RANDOM), sizes and file; the command line (train, generate --adapter, merge refused).
The shared contract (tests/peft/test_contract.py) covers gradients, counts, the refused merge and
save / load.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.autograd import no_grad
from minipeft.autograd.fused import IGNORE_INDEX
from minipeft.data import bundled_model_path
from minipeft.errors import ConfigError
from minipeft.io.safetensors import read_safetensors
from minipeft.io.tokenizer import Tokenizer
from minipeft.peft import PeftModel, get_peft_model
from minipeft.peft.additive.prompt_tuning import PromptTuningConfig
from tests.peft.helpers import logits, randomize, tiny_model, token_ids

WORDS = ["Once", "upon", "a", "time", "there", "was", "a", "little", "girl", "named", "Lily", "she", "liked",
         "to", "play", "in", "the", "park", "with", "her", "dog", "."]


@pytest.fixture(scope="module")
def bundled():
    return bundled_model_path()


def stories(folder):
    return mp.LlamaForCausalLM.from_pretrained(folder)


def make(config=PromptTuningConfig(num_virtual_tokens=3), seed=0, **overrides):
    model = get_peft_model(tiny_model(seed, **overrides), config, seed=seed)
    randomize(model, seed)
    return model.eval()


def table(peft_model, name="default"):
    return peft_model.base_model.model.prompt_encoder.embedding[name].numpy()


@settings(max_examples=6, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       length=st.integers(1, 6))
def test_a_prompt_from_text_continues_that_text(bundled, words, seed, length):
    """TEXT init from T with P = len(ids(T)) (BOS included, as PEFT tokenizes): on x the adapted
    model gives the base model's logits of ids(T) + x at the x positions, and the base model's
    logits of ids(T) at the virtual ones."""
    text = " ".join(words)
    ids_t = Tokenizer.from_pretrained(bundled).encode(text)
    base = stories(bundled)
    x = np.random.default_rng(seed).integers(3, base.config.vocab_size, (2, length))
    expected = logits(base, np.concatenate([np.repeat([ids_t], 2, axis=0), x], axis=1))
    config = PromptTuningConfig(num_virtual_tokens=len(ids_t), prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=text, tokenizer_name_or_path=bundled)
    got = logits(get_peft_model(base, config).eval(), x)
    assert got.shape == expected.shape  # (B, P + T, V): the virtual positions too, as PEFT
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("count", [1, 4, 11])
def test_text_ids_are_cut_or_repeated_to_p(bundled, count):
    text = "Once upon a time"
    ids = Tokenizer.from_pretrained(bundled).encode(text)
    assert ids[0] == 1  # BOS, which PEFT's tokenizer(text)["input_ids"] includes for LLaMA
    want = (ids * math.ceil(count / len(ids)))[:count]
    peft_model = get_peft_model(stories(bundled), PromptTuningConfig(
        num_virtual_tokens=count, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=bundled))
    np.testing.assert_array_equal(table(peft_model), peft_model.model.embed_tokens.weight.numpy()[want])


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), count=st.integers(1, 5), length=st.integers(2, 6))
def test_the_loss_ignores_the_virtual_positions(seed, count, length):
    """Labels get P × −100: the loss is the base model's on [P_e; E[x]] with labels [−100…; x]."""
    peft_model = make(PromptTuningConfig(num_virtual_tokens=count), seed)
    x = token_ids(seed, batch=2, length=length)
    base = peft_model.get_base_model()
    with no_grad():
        got = peft_model(x, labels=x).loss.item()
        embeds = mp.autograd.ops.concat([mp.Tensor(np.repeat(table(peft_model)[None], 2, axis=0)),
                                         base.input_embeddings(x)], axis=1)
        labels = np.concatenate([np.full((2, count), IGNORE_INDEX), x], axis=1)
        with peft_model.disable_adapter():
            expected = base(None, labels=labels, inputs_embeds=embeds).loss.item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_the_loss_of_a_text_prompt_is_the_base_loss_after_that_text(bundled):
    text, x = "Once upon a time", np.array([[403, 407, 261, 378, 300]])
    ids_t = Tokenizer.from_pretrained(bundled).encode(text)
    base = stories(bundled)
    full = np.concatenate([[ids_t], x], axis=1)
    with no_grad():
        expected = base(full, labels=np.where(np.arange(full.shape[1]) < len(ids_t), IGNORE_INDEX, full)).loss.item()
    peft_model = get_peft_model(base, PromptTuningConfig(
        num_virtual_tokens=len(ids_t), prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=bundled))
    with no_grad():
        assert peft_model(x, labels=x).loss.item() == pytest.approx(expected, rel=1e-5)


def test_kv_cache_generation_equals_recomputation():
    peft_model = make()
    ids = token_ids(4, batch=2, length=5)
    cached = peft_model.generate(ids, max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(peft_model.generate(ids, max_new_tokens=8, eos_token_id=[], use_cache=False),
                                  cached)
    with peft_model.disable_adapter():  # the prompt changes what is generated
        assert not np.array_equal(peft_model.generate(ids, max_new_tokens=8, eos_token_id=[]), cached)


def test_a_left_padded_row_is_the_row_alone():
    peft_model = make()
    short, long = token_ids(6, batch=1, length=3), token_ids(7, batch=1, length=6)
    batch = np.concatenate([np.concatenate([np.zeros((1, 3), np.int64), short], axis=1), long])
    mask = np.array([[0, 0, 0, 1, 1, 1], [1] * 6])
    for use_cache in (True, False):
        together = peft_model.generate(batch, attention_mask=mask, max_new_tokens=6, eos_token_id=[],
                                       use_cache=use_cache)
        np.testing.assert_array_equal(together[0, 3:], peft_model.generate(short, max_new_tokens=6,
                                                                           eos_token_id=[])[0])
        np.testing.assert_array_equal(together[1], peft_model.generate(long, max_new_tokens=6, eos_token_id=[])[0])
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # the forward too, given the real tokens' positions
    padded = logits(peft_model, batch, attention_mask=mask, position_ids=positions)
    alone = logits(peft_model, short)[0]
    np.testing.assert_allclose(padded[0, :3], alone[:3], rtol=1e-5, atol=1e-5)  # the virtual positions
    np.testing.assert_allclose(padded[0, 6:], alone[3:], rtol=1e-5, atol=1e-5)  # the real tokens


def test_sizes_are_filled_in_from_the_model_as_peft_does():
    config = make(PromptTuningConfig(num_virtual_tokens=4)).peft_config["default"]
    assert (config.token_dim, config.num_layers, config.num_attention_heads) == (32, 2, 4)  # hidden, L, H
    assert config.num_transformer_submodules == 1
    written = config.to_dict()
    assert written["peft_type"] == "PROMPT_TUNING" and written["prompt_tuning_init"] == "RANDOM"
    assert written["modules_to_save"] is None and written["tokenizer_kwargs"] is None


@pytest.mark.parametrize(("field", "value"), [("num_virtual_tokens", None), ("num_virtual_tokens", 0),
                                              ("token_dim", -1), ("num_transformer_submodules", 2),
                                              ("prompt_tuning_init", "text"), ("task_type", None),
                                              ("prompt_tuning_init_text", 3)])
def test_bad_config_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        PromptTuningConfig(**{"num_virtual_tokens": 2, field: value})


def test_text_init_needs_text_and_a_local_tokenizer(bundled, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):  # PEFT's two checks
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path=bundled)
    missing = PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                 tokenizer_name_or_path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        get_peft_model(tiny_model(), missing)
    other = missing.replace(tokenizer_name_or_path=bundled)  # 512 tokens for a model of 96
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        get_peft_model(tiny_model(), other.replace(prompt_tuning_init_text="Lily liked the park"))
    with pytest.raises(ConfigError, match="tokenizer_kwargs"):  # a PEFT feature minipeft lacks
        PromptTuningConfig.from_dict({**missing.to_dict(), "tokenizer_kwargs": {"use_fast": False}})


def test_random_and_sample_vocab_inits():
    random = table(get_peft_model(tiny_model(), PromptTuningConfig(num_virtual_tokens=64)))
    assert abs(random.mean()) < 0.05 and abs(random.std() - 1) < 0.05  # N(0, 1), nn.Embedding's default
    peft_model = get_peft_model(tiny_model(), PromptTuningConfig(num_virtual_tokens=20,
                                                                 prompt_tuning_init="SAMPLE_VOCAB"))
    embed = peft_model.model.embed_tokens.weight.numpy()
    rows = table(peft_model)
    hits = [np.flatnonzero((embed == row).all(axis=1)) for row in rows]
    assert all(len(h) == 1 for h in hits) and len({int(h[0]) for h in hits}) > 1  # rows of E, several of them


def test_file_holds_the_table_under_peft_key_and_loads_without_the_tokenizer(bundled, tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="Once upon a time", tokenizer_name_or_path=bundled)
    peft_model = get_peft_model(stories(bundled), config).eval()
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "a")
    tensors = read_safetensors(tmp_path / "a" / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (5, 64)
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["prompt_tuning_init"] == "TEXT" and written["tokenizer_name_or_path"] == bundled
    written["tokenizer_name_or_path"] = str(tmp_path / "gone")  # a loaded adapter never reads it
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(written))
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(stories(bundled), tmp_path / "a", is_trainable=trainable).eval()
        np.testing.assert_array_equal(logits(loaded, [[1, 403, 407]]), logits(peft_model, [[1, 403, 407]]))


def test_an_adapter_for_another_model_is_refused(tmp_path):
    make().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="token_dim"):
        PeftModel.from_pretrained(tiny_model(hidden_size=16), tmp_path)


def test_adapters_switch_delete_and_unload():
    peft_model = make()
    with peft_model.disable_adapter():
        plain = logits(peft_model, token_ids())
    peft_model.add_adapter("other", PromptTuningConfig(num_virtual_tokens=5))
    first = logits(peft_model, token_ids())
    peft_model.set_adapter("other")
    other = logits(peft_model, token_ids())
    assert other.shape[1] == first.shape[1] + 2 and {g.name for g in peft_model.parameter_groups()} == {
        "prompt:other"}
    peft_model.delete_adapter("other")
    np.testing.assert_array_equal(logits(peft_model, token_ids()), first)
    model = peft_model.unload()
    assert not hasattr(model, "prompt_encoder")
    np.testing.assert_array_equal(logits(model, token_ids()), plain)


def test_training_lowers_the_loss():
    peft_model = get_peft_model(tiny_model(), PromptTuningConfig(num_virtual_tokens=4)).train()
    ids = token_ids(9, batch=2, length=8)
    params = [p for g in peft_model.parameter_groups() for p in g.params]
    losses = []
    for _ in range(5):
        peft_model.zero_grad()
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        for p in params:
            p.data = p.data - 0.5 * p.grad
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("init", ["random", "text"])
def test_cli_trains_generates_and_refuses_merge(capsys, tmp_path, init):
    from tests.test_cli_train import run, small_data  # noqa: PLC0415

    data, out = small_data(tmp_path, n=8), tmp_path / "run"
    extra = ("--prompt-init", "text", "--prompt-init-text", "Once upon a time") if init == "text" else ()
    code, _, err = run(capsys, "train", "--data", data, "--out", out, "--method", "prompt",
                       "--prompt-tokens", 4, *extra, "--steps", 2, "--batch-size", 2, "--seq-len", 64,
                       "--eval-every", 2, "--warmup", 0)
    assert code == 0, err
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "PROMPT_TUNING" and written["num_virtual_tokens"] == 4
    assert written["prompt_tuning_init"] == init.upper()
    assert "trainable params: 256 ||" in err  # P·d = 4 · 64
    code, stdout, err = run(capsys, "generate", "--adapter", out, "--prompt", "Once", "--max-new-tokens", 6)
    assert code == 0 and stdout.startswith("Once"), err
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--out", tmp_path / "merged")
    assert code == 1 and "cannot be merged" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()


def test_cli_text_init_without_text_is_refused_naming_the_field(capsys, tmp_path):
    from tests.test_cli_train import run, small_data  # noqa: PLC0415

    code, _, err = run(capsys, "train", "--data", small_data(tmp_path, n=8), "--out", tmp_path / "run",
                       "--method", "prompt", "--prompt-init", "text", "--steps", 1)
    assert code != 0 and "prompt_tuning_init_text" in err
