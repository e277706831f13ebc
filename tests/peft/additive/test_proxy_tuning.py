"""Proxy-tuning (Liu et al., 2024): z = z_base + α (z_expert − z_anti) at every decoding step.

Properties: expert == anti-expert and α = 0 give the base alone (ids and every step's
distribution); raw logits and log-probabilities give the same softmax; wider experts are cut
to the base's vocabulary (against a from-scratch re-computation of the authors' loop);
different tokenizers are refused; KV cache == recomputation; a left-padded row == that row
alone; the command line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minipeft as mp
from minipeft.autograd import no_grad
from minipeft.cli import main
from minipeft.models.generation import check_prompt, decode, model_step
from minipeft.peft.additive.proxy_tuning import ProxyTuningConfig, combine_logits, log_softmax
from tests.peft.helpers import randomize, tiny_model

V = 96  # tiny_model's vocabulary


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = np.array([[pad] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def recording(step, log):
    """A decoding callback that also keeps every step's logits."""
    def recorded(*args):
        z = step(*args)
        log.append(np.array(z, dtype=np.float64))
        return z
    return recorded


def lora_expert(seed=1):
    """A small model plus a randomised LoRA adapter: an expert "model plus adapter"."""
    config = mp.peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = mp.peft.get_peft_model(tiny_model(seed), config, seed=0)
    randomize(model, seed=seed)
    return model


SAMPLING = st.one_of(
    st.just(dict(temperature=0.0)),
    st.fixed_dictionaries(dict(temperature=st.floats(0.3, 2.0), top_k=st.one_of(st.none(), st.integers(1, 30)),
                               top_p=st.one_of(st.none(), st.floats(0.1, 1.0)))))


# ----- the combination ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3), width=st.integers(2, 30), extra=st.tuples(st.integers(0, 4), st.integers(0, 4)),
       alpha=st.floats(-3.0, 3.0), data=st.data())
def test_logits_and_logprobs_give_the_same_distribution(batch, width, extra, alpha, data):
    """log-softmax shifts each model's row by a constant, so the combined softmax is unchanged;
    the wider models' extra columns are cut before either combination."""
    draw = lambda w: data.draw(hnp.arrays(np.float32, (batch, w), elements=st.floats(-20, 20, width=32)))  # noqa: E731
    z_base, z_expert, z_anti = draw(width), draw(width + extra[0]), draw(width + extra[1])
    raw = combine_logits(z_base, z_expert, z_anti, alpha, space="logits")
    logp = combine_logits(z_base, z_expert, z_anti, alpha, space="logprobs")
    assert raw.shape == logp.shape == (batch, width) and raw.dtype == np.float64
    np.testing.assert_allclose(softmax(raw), softmax(logp), rtol=1e-9, atol=1e-12)
    expected = z_base.astype(np.float64) + alpha * (z_expert[:, :width].astype(np.float64) - z_anti[:, :width])
    np.testing.assert_array_equal(raw, expected)
    np.testing.assert_allclose(np.exp(log_softmax(raw)).sum(-1), 1.0, rtol=1e-12)


def test_combination_refuses_narrow_experts_and_unknown_spaces():
    z = np.zeros((1, 8))
    with pytest.raises(mp.ConfigError, match="expert's logits have 7 columns"):
        combine_logits(z, z[:, :7], z)
    with pytest.raises(mp.ConfigError, match="space"):
        combine_logits(z, z, z, space="probs")


@pytest.mark.parametrize("field, kwargs", [("alpha", dict(alpha=float("nan"))), ("alpha", dict(alpha=True)),
                                           ("alpha", dict(alpha="1")), ("space", dict(space="probs"))])
def test_config_names_the_bad_field(field, kwargs):
    with pytest.raises(mp.ConfigError, match=f"ProxyTuningConfig.{field}"):
        ProxyTuningConfig(**kwargs)


# ----- identities: the base alone ------------------------------------------------------------
@settings(max_examples=12, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), alpha=st.floats(-2.0, 3.0), sampling=SAMPLING, peft_expert=st.booleans(),
       one_object=st.booleans(), space=st.sampled_from(["logits", "logprobs"]))
def test_expert_equal_to_antiexpert_gives_the_base(seed, alpha, sampling, peft_expert, one_object, space):
    """Two copies of one small model (or of one model plus adapter), or one object passed twice
    (each role still keeps its own cache): the difference is exactly 0, so every step's
    distribution and the ids are the base model's."""
    base = tiny_model(seed)
    make = lora_expert if peft_expert else tiny_model
    expert = make(seed + 1)
    anti = expert if one_object else make(seed + 1)
    proxy = mp.ProxyTuning(base, expert, anti, alpha=alpha, space=space)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    kwargs = dict(max_new_tokens=6, seed=seed, **sampling)
    np.testing.assert_array_equal(proxy.generate(ids, attention_mask=mask, eos_token_id=[], **kwargs),
                                  base.generate(ids, attention_mask=mask, eos_token_id=[], **kwargs))
    ids, mask = check_prompt(ids, mask)
    seen_proxy, seen_base = [], []
    decode(recording(proxy.next_logits(), seen_proxy), ids, mask, set(), 0, **kwargs)
    decode(recording(model_step(base), seen_base), ids, mask, set(), 0, **kwargs)
    assert len(seen_proxy) == len(seen_base) == 6
    for z_proxy, z_base in zip(seen_proxy, seen_base):
        if space == "logits":
            np.testing.assert_array_equal(z_proxy, z_base)
        np.testing.assert_allclose(softmax(z_proxy), softmax(z_base), rtol=1e-9, atol=1e-15)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), sampling=SAMPLING)
def test_alpha_zero_gives_the_base(seed, sampling):
    base, expert, anti = tiny_model(seed), lora_expert(seed + 1), tiny_model(seed + 2)
    ids = np.array([[3, 4, 5]])
    kwargs = dict(max_new_tokens=8, seed=seed, eos_token_id=[], **sampling)
    np.testing.assert_array_equal(mp.ProxyTuning(base, expert, anti, alpha=0.0).generate(ids, **kwargs),
                                  base.generate(ids, **kwargs))


def test_different_experts_do_steer():
    """The test above is not vacuous: with α = 1 a real expert/anti-expert pair moves the base."""
    base, expert, anti = tiny_model(0), tiny_model(1), tiny_model(2)
    ids = np.array([[3, 4, 5]])
    steered = mp.ProxyTuning(base, expert, anti).generate(ids, max_new_tokens=8, eos_token_id=[])
    assert (steered != base.generate(ids, max_new_tokens=8, eos_token_id=[])).any()


# ----- the authors' loop, recomputed; vocabulary cut --------------------------------------------
def authors_loop(base, expert, anti, ids, alpha, steps):
    """Greedy proxy-tuning written out as the authors do, without a cache: full forward of each
    model, last position, expert logits cut to the base's width, argmax of the sum."""
    ids = np.array(ids)
    with no_grad():
        for _ in range(steps):
            z_b, z_e, z_a = (m(ids).logits.numpy()[:, -1, :].astype(np.float64) for m in (base, expert, anti))
            width = z_b.shape[-1]
            z = z_b + alpha * (z_e[:, :width] - z_a[:, :width])
            ids = np.concatenate((ids, z.argmax(-1)[:, None]), axis=1)
    return ids


@pytest.mark.parametrize("widths", [(V, V), (V + 4, V + 4), (V + 2, V + 7)], ids=["same", "wider", "both-wider"])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_equals_the_authors_loop_with_vocab_cut(widths, alpha):
    base = tiny_model(0)
    expert, anti = tiny_model(1, vocab_size=widths[0]), tiny_model(2, vocab_size=widths[1])
    if widths[0] > V:  # make the cut columns matter: the expert loves them most
        expert.lm_head.weight.data[V:] *= 50
    ids = np.array([[3, 4, 5, 6], [7, 8, 9, 10]])
    got = mp.ProxyTuning(base, expert, anti, alpha=alpha).generate(ids, max_new_tokens=10, eos_token_id=[])
    np.testing.assert_array_equal(got, authors_loop(base, expert, anti, ids, alpha, 10))
    assert got.max() < V


def test_an_expert_narrower_than_the_base_is_refused():
    with pytest.raises(mp.ConfigError, match="expert's vocab_size 90 is smaller than the base's 96"):
        mp.ProxyTuning(tiny_model(0), tiny_model(1, vocab_size=90), tiny_model(2))
    with pytest.raises(mp.ConfigError, match="antiexpert's vocab_size"):
        mp.ProxyTuning(tiny_model(0), tiny_model(1), tiny_model(2, vocab_size=90))


# ----- cache and padding --------------------------------------------------------------------
@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), alpha=st.floats(-1.0, 3.0), sampling=SAMPLING,
       pads=st.lists(st.integers(0, 4), min_size=1, max_size=3), new=st.integers(1, 7))
def test_kv_cache_equals_recomputation(seed, alpha, sampling, pads, new):
    proxy = mp.ProxyTuning(tiny_model(seed), lora_expert(seed + 1), tiny_model(seed + 2, vocab_size=V + 3),
                           alpha=alpha)
    ids = np.random.default_rng(seed).integers(3, V, (len(pads), 5))
    mask = (np.arange(5)[None, :] >= np.array(pads)[:, None]).astype(np.int64)
    kwargs = dict(attention_mask=mask, max_new_tokens=new, seed=seed, **sampling)
    ids = np.where(mask == 1, ids, 0)
    cached = proxy.generate(ids, use_cache=True, **kwargs)
    np.testing.assert_array_equal(cached, proxy.generate(ids, use_cache=False, **kwargs))
    np.testing.assert_array_equal(cached[:, :5], ids)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.5, 2.0))
def test_left_padded_row_equals_the_row_alone(seed, alpha):
    proxy = mp.ProxyTuning(tiny_model(seed), lora_expert(seed + 1), tiny_model(seed + 2), alpha=alpha)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    ids, mask = left_pad(rows, pad=4)
    out = proxy.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for i, row in enumerate(rows):
        alone = proxy.generate(np.array([row]), max_new_tokens=8, eos_token_id=[])
        np.testing.assert_array_equal(out[i, ids.shape[1]:], alone[0, len(row):])


def test_stop_and_pad_ids_come_from_the_base():
    base, expert, anti = tiny_model(0), tiny_model(1), tiny_model(2)
    proxy = mp.ProxyTuning(base, expert, anti)
    prompt = np.array([[5, 6, 7]])
    free = proxy.generate(prompt, max_new_tokens=10, eos_token_id=[])[0, 3:].tolist()
    target = free[3]
    base.generation_config = {"eos_token_id": [target]}
    expert.generation_config = anti.generation_config = {"eos_token_id": [free[0]]}  # not used
    assert proxy.generate(prompt, max_new_tokens=10).shape[1] == 3 + free.index(target) + 1


# ----- tokenizers -----------------------------------------------------------------------------
def word_tokenizer(words, kind="wordlevel"):
    vocab = {w: i for i, w in enumerate(words)}
    if kind == "wordlevel":
        model = tokenizers.models.WordLevel(vocab, unk_token=words[0])
    else:
        model = tokenizers.models.BPE(vocab, [], unk_token=words[0])
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return mp.Tokenizer(backend, bos_token_id=1, eos_token_id=2)


WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(V - 3)]


def test_tokenizers_must_agree_on_every_used_id():
    base, expert, anti = tiny_model(0), tiny_model(1, vocab_size=V + 1), tiny_model(2)
    same = word_tokenizer(WORDS)
    with_pad = word_tokenizer(WORDS + ["<pad>"])  # an added token past the base's width is fine
    proxy = mp.ProxyTuning(base, expert, anti, tokenizers=(same, with_pad, word_tokenizer(WORDS)))
    assert proxy.tokenizer is same
    swapped = WORDS[:10] + [WORDS[11], WORDS[10]] + WORDS[12:]
    with pytest.raises(mp.ConfigError, match="antiexpert's tokenizer differs.*id 10 is 'w7'"):
        mp.ProxyTuning(base, expert, anti, tokenizers=(same, same, word_tokenizer(swapped)))
    with pytest.raises(mp.ConfigError, match="expert's tokenizer differs.*WordLevel vs BPE"):
        mp.ProxyTuning(base, expert, anti, tokenizers=(same, word_tokenizer(WORDS, "bpe"), same))
    with pytest.raises(mp.ConfigError, match="expert's tokenizer differs.*id 95"):
        mp.ProxyTuning(base, expert, anti, tokenizers=(same, word_tokenizer(WORDS[:-1]), same))
    with pytest.raises(mp.ConfigError, match="tokenizers must be"):
        mp.ProxyTuning(base, expert, anti, tokenizers=(same, same))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base / expert / anti-expert folders of tiny models with the bundled tokenizer (512 ids),
    an expert LoRA adapter folder, and an expert folder whose tokenizer swaps two tokens."""
    root = tmp_path_factory.mktemp("proxy")
    bundled = Path(mp.bundled_model_path())
    paths = {}
    for name, seed in (("base", 0), ("expert", 1), ("anti", 2), ("other_tok", 1)):
        paths[name] = root / name
        tiny_model(seed, vocab_size=512).save_pretrained(paths[name])
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(bundled / f, paths[name] / f)
    spec = json.loads((paths["other_tok"] / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [k for k, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (paths["other_tok"] / "tokenizer.json").write_text(json.dumps(spec))
    expert = mp.peft.get_peft_model(tiny_model(1, vocab_size=512),
                                    mp.peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize(expert, seed=5)
    paths["adapter"] = root / "adapter"
    expert.save_pretrained(paths["adapter"])
    return paths


def test_from_folders_loads_the_adapter_and_checks_tokenizers(folders):
    proxy = mp.ProxyTuning.from_folders(folders["base"], folders["expert"], folders["anti"],
                                        expert_adapter=folders["adapter"], alpha=1.5)
    assert isinstance(proxy.expert, mp.peft.PeftModel) and proxy.config.alpha == 1.5
    by_hand = mp.ProxyTuning(mp.LlamaForCausalLM.from_pretrained(folders["base"]),
                             mp.peft.PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(folders["expert"]),
                                                               folders["adapter"]),
                             mp.LlamaForCausalLM.from_pretrained(folders["anti"]), alpha=1.5)
    plain = mp.ProxyTuning.from_folders(folders["base"], folders["expert"], folders["anti"], alpha=1.5)
    ids = np.array([[1, 300, 301]])
    got = proxy.generate(ids, max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(got, by_hand.generate(ids, max_new_tokens=8, eos_token_id=[]))
    assert (got != plain.generate(ids, max_new_tokens=8, eos_token_id=[])).any()  # the adapter is used
    with pytest.raises(mp.ConfigError, match="expert's tokenizer differs.*id 300"):
        mp.ProxyTuning.from_folders(folders["base"], folders["other_tok"], folders["anti"])


# ----- the command line -----------------------------------------------------------------------
def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_with_proxy_options(capsys, folders):
    sampling = ("--prompt", "Once upon a time", "--max-new-tokens", "12", "--temperature", "0.9",
                "--top-k", "40", "--top-p", "0.95", "--seed", "3")
    bundled = str(mp.bundled_model_path())
    code, out, err = cli(capsys, "generate", "--model", bundled, "--proxy-expert", str(folders["expert"]),
                         "--proxy-expert-adapter", str(folders["adapter"]), "--proxy-antiexpert",
                         str(folders["anti"]), "--proxy-alpha", "2", *sampling)
    assert code == 0 and "tokens/s" in err
    tok = mp.Tokenizer.from_pretrained(bundled)
    proxy = mp.ProxyTuning.from_folders(bundled, folders["expert"], folders["anti"],
                                        expert_adapter=folders["adapter"], alpha=2.0)
    ids = tok.encode("Once upon a time")
    expected = proxy.generate(np.array([ids]), max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=3)
    assert out == tok.decode(expected[0].tolist()) + "\n"
    # expert == anti-expert: the bundled model's own text
    same = cli(capsys, "generate", "--proxy-expert", str(folders["anti"]), "--proxy-antiexpert",
               str(folders["anti"]), *sampling)
    assert same[1] == cli(capsys, "generate", *sampling)[1] != out


@pytest.mark.parametrize("argv, needle", [
    (("--proxy-expert", "E"), "both --proxy-expert and --proxy-antiexpert"),
    (("--proxy-expert-adapter", "A"), "--proxy-expert-adapter needs"),
    (("--proxy-expert", "E", "--proxy-antiexpert", "A", "--adapter", "X"), "--adapter / --rank"),
])
def test_cli_proxy_option_errors(capsys, argv, needle):
    code, out, err = cli(capsys, "generate", *argv)
    assert code == 1 and out == "" and err.startswith("minipeft: error:") and needle in err


def test_cli_refuses_a_different_tokenizer(capsys, folders):
    code, out, err = cli(capsys, "generate", "--model", str(folders["base"]), "--proxy-expert",
                         str(folders["other_tok"]), "--proxy-antiexpert", str(folders["anti"]))
    assert code == 1 and out == "" and "tokenizer differs" in err and len(err.splitlines()) == 1
