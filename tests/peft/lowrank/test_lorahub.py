"""LoRAHub (lorahub.py) and its optimiser CMA-ES (es.py): the composition equations,
one-hot weights give the adapter itself, the search stays in its box, CMA-ES minimises,
the composed adapter loads in Hugging Face PEFT (oracle), and ``minipeft lorahub``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.autograd import is_grad_enabled
from minipeft.cli import main
from minipeft.errors import ConfigError
from minipeft.peft import LoraConfig, PeftModel, get_peft_model
from minipeft.peft.lowrank import es
from minipeft.peft.lowrank.lorahub import LoraHub, LoraHubConfig
from tests.peft.helpers import hf_checkpoint, hf_model, import_oracles, logits, randomize, tiny_model, token_ids

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
WEIGHTS = st.lists(st.floats(-1.5, 1.5), min_size=3, max_size=3).map(np.array)


def sources(seed=0, ranks=(2, 2, 2), alphas=(4, 4, 4), model=None, targets=TARGETS):
    """A float64 PeftModel holding random adapters a, b, c on the same layers."""
    base = model if model is not None else tiny_model(seed, dtype=np.float64)
    peft_model = get_peft_model(base, LoraConfig(r=ranks[0], lora_alpha=alphas[0], target_modules=targets),
                                adapter_name="a", seed=seed)
    for name, r, alpha in zip("bc", ranks[1:], alphas[1:]):
        peft_model.add_adapter(name, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    randomize(peft_model, seed, scale=0.4)
    return peft_model.eval()


def single_logits(peft_model, ids):
    """Each source adapter's own logits, and the base model's."""
    out = {}
    for name in "abc":
        peft_model.set_adapter(name, inference_mode=True)
        out[name] = logits(peft_model, ids)
    with peft_model.disable_adapter():
        out["base"] = logits(peft_model, ids)
    return out


MODES = {False: dict(), True: dict(ranks=(2, 3, 1), alphas=(4, 2, 5))}  # exact allows any ranks / scalings


# ----- the composition ----------------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(0, 2), exact=st.booleans())
def test_one_hot_weights_give_that_adapter_and_zero_weights_the_base_model(seed, k, exact):
    peft_model, ids = sources(seed, **MODES[exact]), token_ids(seed)
    expected = single_logits(peft_model, ids)
    hub = LoraHub(peft_model, list("abc"), LoraHubConfig(exact=exact))
    hub.set_weights(np.eye(3)[k])
    np.testing.assert_allclose(logits(peft_model, ids), expected["abc"[k]], rtol=1e-12, atol=1e-12)
    hub.set_weights(np.zeros(3))
    np.testing.assert_array_equal(logits(peft_model, ids), expected["base"])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), w=WEIGHTS)
def test_exact_is_the_weighted_sum_of_the_deltas(seed, w):
    peft_model = sources(seed, **MODES[True])
    hub = LoraHub(peft_model, list("abc"), LoraHubConfig(exact=True))
    hub.set_weights(w)
    for layer in hub.layers:  # delta_ba(n) = s_n B_n A_n
        exact = sum(wi * layer.delta_ba(n) for n, wi in zip("abc", w))
        np.testing.assert_allclose(layer.delta_ba(hub.name), exact, atol=1e-12)
        np.testing.assert_allclose(hub.delta_weight(layer, w), exact, atol=1e-12)
        assert layer.r[hub.name] == 6 and layer.scaling[hub.name] == 1.0


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), w=WEIGHTS)
def test_the_mix_is_s_times_the_product_of_the_weighted_factors(seed, w):
    peft_model = sources(seed)
    hub = LoraHub(peft_model, list("abc"), LoraHubConfig())
    expected = []
    for layer in hub.layers:
        A, B = (sum(wi * layer.factors(n)[f].data for n, wi in zip("abc", w)) for f in (0, 1))
        s = layer.scaling["a"]
        expected.append(s * B @ A)
        np.testing.assert_allclose(hub.delta_weight(layer, w), s * B @ A, atol=1e-12)
        assert layer.r[hub.name] == 2 and layer.scaling[hub.name] == s
    for sign in (1, -1):  # ΔW is quadratic in w: w and -w give the same adapter
        hub.set_weights(sign * w)
        for layer, delta in zip(hub.layers, expected):
            np.testing.assert_allclose(layer.delta_ba(hub.name), delta, atol=1e-12)


def test_the_mix_has_cross_terms_and_exact_has_none():
    w = np.array([0.9, -0.7, 0.5])
    mixed, exact = (LoraHub(sources(), list("abc"), LoraHubConfig(exact=e)) for e in (False, True))
    for hub in (mixed, exact):
        hub.set_weights(w)
    for layer_m, layer_e in zip(mixed.layers, exact.layers):
        weighted_sum = sum(wi * layer_e.delta_ba(n) for n, wi in zip("abc", w))
        np.testing.assert_allclose(layer_e.delta_ba(exact.name), weighted_sum, atol=1e-12)
        assert np.abs(layer_m.delta_ba(mixed.name) - weighted_sum).max() > 1e-3


def test_set_weights_overwrites_the_same_parameters_in_place():
    peft_model = sources()
    hub = LoraHub(peft_model, list("abc"))
    params = [id(p) for p in peft_model.parameters()]
    adapters = list(peft_model.peft_config)
    for w in ([0.1, 0.2, 0.3], [1.0, -1.0, 0.0]):
        hub.set_weights(w)
        assert [id(p) for p in peft_model.parameters()] == params and list(peft_model.peft_config) == adapters
    assert peft_model.active_adapters == [hub.name] and peft_model.get_nb_trainable_parameters()[0] == 0


def test_refusals():
    with pytest.raises(ConfigError, match="equal ranks and scalings"):
        LoraHub(sources(ranks=(2, 3, 2)), list("abc"))
    with pytest.raises(ConfigError, match="equal ranks and scalings"):
        LoraHub(sources(alphas=(4, 8, 4)), list("abc"))
    other = sources()
    other.add_adapter("d", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="same layers"):
        LoraHub(other, ["a", "d"])
    with pytest.raises(ConfigError, match="not found"):
        LoraHub(sources(), ["a", "zzz"])
    dora = get_peft_model(tiny_model(), LoraConfig(use_dora=True), adapter_name="a")
    with pytest.raises(ConfigError, match="plain LoRA"):
        LoraHub(dora, ["a"])
    with pytest.raises(ValueError, match="need 3 weights"):
        LoraHub(sources(), list("abc")).set_weights([1.0, 2.0])
    for bad in (dict(budget=0), dict(lower=0.5), dict(upper=-1.0), dict(l1=-1), dict(sigma0=0), dict(popsize=1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            LoraHubConfig(**bad)


# ----- the search -------------------------------------------------------------------------
def test_search_from_zero_returns_the_best_evaluation_and_leaves_the_model_there():
    peft_model, ids = sources(), token_ids()
    hub = LoraHub(peft_model, list("abc"), LoraHubConfig(budget=15, seed=3))
    seen = []

    def loss_fn(model):
        assert model is hub.peft_model and not is_grad_enabled() and not model.training
        seen.append(logits(model, ids))
        return model(ids, labels=ids).loss.item()

    found = hub.search(loss_fn)
    assert len(found.history) == len(seen) == 15 and np.array_equal(found.history[0][0], np.zeros(3))
    for w, loss, value in found.history:
        assert np.all(np.abs(w) <= 1.5) and value == pytest.approx(loss + 0.05 * np.mean(np.abs(w)), abs=1e-12)
    best = min(found.history, key=lambda h: h[2])
    assert found.objective == best[2] and found.loss == best[1] and np.array_equal(found.weights, best[0])
    assert found.objective <= found.history[0][2]  # never worse than the base model, w = 0
    np.testing.assert_array_equal(logits(peft_model, ids), seen[[h[2] for h in found.history].index(best[2])])
    hub = LoraHub(sources(), list("abc"), LoraHubConfig(budget=15, seed=3))
    np.testing.assert_array_equal(hub.search(loss_fn).weights, found.weights)  # seeded: the same search


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), budget=st.integers(1, 60),
       target=st.floats(-6, 6), sigma0=st.floats(0.05, 3.0))
def test_the_search_never_evaluates_or_returns_a_point_outside_the_box(seed, n, budget, target, sigma0):
    evaluated = []

    def f(x):
        evaluated.append(x)
        return float(np.sum((x - target) ** 2))  # the optimum may lie far outside the box

    found = es.minimize(f, np.zeros(n), sigma0, budget, np.random.default_rng(seed), -1.5, 1.5)
    assert len(evaluated) == len(found.evaluations) == budget
    assert all(np.all(np.abs(x) <= 1.5) for x in evaluated) and np.all(np.abs(found.x) <= 1.5)


# ----- CMA-ES itself ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 5])
def test_cma_es_minimises_the_sphere(n):
    center = np.linspace(-1.0, 1.0, n) * 0.7
    found = es.minimize(lambda x: np.sum((x - center) ** 2), np.zeros(n), 0.5, 800, np.random.default_rng(0),
                        -1.5, 1.5)
    assert found.fx < 1e-10 and np.abs(found.x - center).max() < 1e-5


def test_cma_es_learns_the_covariance_of_a_rotated_ill_conditioned_quadratic():
    n, rng = 4, np.random.default_rng(1)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    H = Q @ np.diag(np.logspace(0, 4, n)) @ Q.T  # condition number 10⁴
    center = np.array([0.3, -0.8, 0.5, 1.1])
    f = lambda x: (x - center) @ H @ (x - center)  # noqa: E731
    es_run = es.CMAES(np.zeros(n), 0.5, np.random.default_rng(0), -1.5, 1.5)
    for _ in range(300):
        xs = es_run.ask()
        es_run.tell(xs, [f(x) for x in xs])
    assert f(es_run.mean) < 1e-10
    cos = np.linalg.inv(H) / np.linalg.norm(np.linalg.inv(H)), es_run.C / np.linalg.norm(es_run.C)
    assert np.sum(cos[0] * cos[1]) > 0.9  # C has learned the shape of H⁻¹


def test_cma_es_finds_an_optimum_on_the_boundary():
    """Slower than inside the box (candidates beyond the bound are redrawn), but it gets there."""
    found = es.minimize(lambda x: np.sum((x - np.array([3.0, -0.5])) ** 2), np.zeros(2), 0.5, 1000,
                        np.random.default_rng(0), -1.5, 1.5)
    np.testing.assert_allclose(found.x, [1.5, -0.5], atol=1e-4)


# ----- files, PEFT, the command line ----------------------------------------------------------------
def save_sources(peft_model, folder) -> list[Path]:
    peft_model.save_pretrained(folder)
    return [folder / name for name in "abc"]


@pytest.mark.parametrize("exact", [False, True])
def test_the_composition_saves_as_a_lora_adapter_that_loads_here(exact, tmp_path):
    folders = save_sources(sources(**MODES[exact]), tmp_path / "sources")
    hub = LoraHub.from_pretrained(tiny_model(0, dtype=np.float64), folders, LoraHubConfig(exact=exact))
    hub.set_weights([0.6, -1.2, 0.9])
    expected = logits(hub.peft_model, token_ids())
    hub.save_pretrained(tmp_path / "hub")
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(tiny_model(0, dtype=np.float64), tmp_path / "hub")
    np.testing.assert_allclose(logits(loaded, token_ids()), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("exact", [False, True])
def test_the_composition_loads_in_peft_with_the_same_logits(exact, tmp_path):
    torch, _, peft = import_oracles()
    folder = hf_checkpoint(tmp_path / "hf")
    folders = save_sources(sources(model=mp.LlamaForCausalLM.from_pretrained(folder), **MODES[exact]),
                           tmp_path / "sources")
    hub = LoraHub.from_pretrained(mp.LlamaForCausalLM.from_pretrained(folder), folders, LoraHubConfig(exact=exact))
    hub.set_weights([0.6, -1.2, 0.9])
    hub.save_pretrained(tmp_path / "hub")
    theirs = peft.PeftModel.from_pretrained(hf_model(folder), str(tmp_path / "hub"))
    with torch.no_grad():
        got = theirs(torch.tensor(token_ids())).logits.numpy()
    expected = logits(hub.peft_model, token_ids())
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_the_mix_is_what_the_papers_code_loads_into_peft(tmp_path):
    """The paper's get_score: Σ w_i · (state dict of adapter i), set into a PEFT model of adapter 0.
    (Linear targets only: with an embedding target that state dict also holds the base embedding
    weight, which the paper's code would scale by Σ w_i as well.)"""
    torch, _, peft = import_oracles()
    from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: PLC0415

    folder, w = hf_checkpoint(tmp_path / "hf"), [0.6, -1.2, 0.9]
    folders = save_sources(sources(model=mp.LlamaForCausalLM.from_pretrained(folder), targets=TARGETS[:3]),
                           tmp_path / "sources")
    states = [get_peft_model_state_dict(peft.PeftModel.from_pretrained(hf_model(folder), str(f))) for f in folders]
    theirs = peft.PeftModel.from_pretrained(hf_model(folder), str(folders[0]))
    set_peft_model_state_dict(theirs, {k: sum(wi * s[k] for wi, s in zip(w, states)) for k in states[0]})
    with torch.no_grad():
        expected = theirs(torch.tensor(token_ids())).logits.numpy()
    hub = LoraHub.from_pretrained(mp.LlamaForCausalLM.from_pretrained(folder), folders)
    hub.set_weights(w)
    got = logits(hub.peft_model, token_ids())
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_cli_lorahub_prints_the_weights_and_losses_and_writes_an_adapter_generate_loads(capsys, tmp_path):
    path = mp.bundled_model_path()
    peft_model = get_peft_model(mp.LlamaForCausalLM.from_pretrained(path),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    for name in "bc":
        peft_model.add_adapter(name, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize(peft_model, scale=0.1)
    folders = save_sources(peft_model, tmp_path / "sources")
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["Zoe went to the beach.", "Zoe and Max played in the sand.", "The sun was warm."]))
    out = tmp_path / "hub"
    code = main(["lorahub", "--adapters", *map(str, folders), "--data", str(data), "--out", str(out),
                 "--budget", "9", "--seed", "1"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("weights: ") and lines[0].count("=") == 3 and f"adapter: {out}" in lines[-1]
    assert "[9/9]" in stderr and "base model" in stdout and all(str(f) in stdout for f in folders)
    composed = float(next(line for line in lines if "LoRAHub composition" in line).split()[2])
    loaded = PeftModel.from_pretrained(mp.LlamaForCausalLM.from_pretrained(path), out)
    tok = mp.Tokenizer.from_pretrained(path)
    data_set = mp.train.build_dataset(mp.train.read_jsonl(data), tok, 256)
    assert mp.train.evaluate(loaded, data_set)["eval_loss"] == pytest.approx(composed, abs=1e-4)
    assert main(["generate", "--adapter", str(out), "--prompt", "Once", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Once")


def test_dylora_and_relora_sources_are_refused():
    """Their A, B alone are not the adapter (a rank to truncate to; merges at restarts)."""
    from minipeft.errors import ConfigError
    from minipeft.peft.lowrank.dylora import DyLoraConfig
    from minipeft.peft.lowrank.lorahub import _check_sources
    from minipeft.peft.lowrank.relora import ReLoraConfig

    for config in (DyLoraConfig(r=4, target_modules=["q_proj"]), ReLoraConfig(r=4, target_modules=["q_proj"])):
        base = mp.LlamaForCausalLM(mp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                                  num_hidden_layers=1, num_attention_heads=2),
                                   rng=np.random.default_rng(0))
        model = mp.peft.get_peft_model(base, config)
        with pytest.raises(ConfigError, match="plain LoRA"):
            _check_sources(model, ["default"])
