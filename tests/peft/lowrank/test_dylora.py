"""DyLoRA (peft/dylora.py): rank b is LoRA built from the first b factors with scale α/b;
frozen mode trains only row / column b; ranks are drawn from the PeftModel's rng; eval,
merge, save and the CLI work at any rank; a resumed run continues exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.peft import DyLoraConfig, LoraConfig, PeftModel, get_peft_model
from minipeft.peft.lowrank.dylora import adapter_layers
from minipeft.train import Trainer, TrainingArguments, build_dataset, evaluate
from minipeft.train.data import Record
from minipeft.peft.lowrank.dylora import format_rank_table, loss_per_rank
from tests.peft.helpers import logits, randomize, tiny_model, token_ids
from tests.test_cli_train import TRAIN, run, small_data
from tests.train.train_helpers import CharTokenizer

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def dylora(r=6, alpha=12.0, seed=0, **kw):
    model = get_peft_model(tiny_model(seed), DyLoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, **kw),
                           seed=seed)
    randomize(model, seed)
    return model


def truncated_lora(model, b, alpha, seed=0):
    """A plain LoRA of rank b, lora_alpha α (s = α/b) holding the first b rows of A / columns of B."""
    lora = get_peft_model(tiny_model(seed), LoraConfig(r=b, lora_alpha=alpha, target_modules=TARGETS), seed=seed)
    theirs = dict(lora.named_parameters())
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_embedding_A" in name:
            theirs[name].data = p.data[:b].copy()
        elif "lora_B" in name or "lora_embedding_B" in name:
            theirs[name].data = p.data[:, :b].copy()
    return lora.eval()


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 6), seed=st.integers(0, 2**16), alpha=st.floats(0.5, 32))
def test_rank_b_is_lora_of_the_truncated_factors(b, seed, alpha):
    model, ids = dylora(alpha=alpha, seed=seed), token_ids(seed)
    expected = logits(truncated_lora(model, b, alpha, seed), ids)
    model.set_rank(b)
    model.eval()
    np.testing.assert_allclose(logits(model, ids), expected, rtol=1e-5, atol=1e-6)  # eval rank b
    model.train()
    for layer in adapter_layers(model, "default"):
        layer.train_rank["default"] = b
    np.testing.assert_allclose(logits(model, ids), expected, rtol=1e-5, atol=1e-6)  # training at rank b
    model.eval().merge_adapter()  # merged ΔW is that of the truncated factors
    np.testing.assert_allclose(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_rank_r_max_is_lora_bit_for_bit():
    model, ids = dylora(), token_ids()
    np.testing.assert_array_equal(logits(model.eval(), ids), logits(truncated_lora(model, 6, 12.0), ids))


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 5), seed=st.integers(0, 2**16), frozen=st.booleans())
def test_only_rows_up_to_b_learn_and_frozen_mode_only_row_b(b, seed, frozen):
    model = dylora(r=5, seed=seed, frozen=frozen)
    for layer in adapter_layers(model, "default"):
        layer.train_rank["default"] = b
    model.train()
    model(token_ids(seed), labels=token_ids(seed + 1)).loss.backward()
    model.mask_gradients(0)
    for layer in adapter_layers(model, "default"):
        A, B = layer.factors("default")
        for grad in (A.grad, B.grad.T):  # rank index first
            live = [i for i in range(5) if np.any(grad[i] != 0)]
            assert live == ([b - 1] if frozen else list(range(b))), (type(layer).__name__, live)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_frozen_training_changes_only_row_and_column_b(seed):
    """Steps as the trainer makes them (backward, mask_gradients, SGD, on_step_end): each moves
    only row b of A and column b of B, b the rank drawn for that step."""
    model = dylora(r=4, seed=seed, frozen=True).train()
    params = [p for g in model.parameter_groups() for p in g.params]
    for step in range(3):
        before = {n: p.data.copy() for n, p in model.named_parameters()}
        b = adapter_layers(model, "default")[0].train_rank["default"]
        model.zero_grad()
        model(token_ids(seed + step), labels=token_ids(seed + step + 1)).loss.backward()
        model.mask_gradients(step)
        for p in params:
            p.data = p.data - 0.1 * p.grad
        model.on_step_end(step)
        for name, p in model.named_parameters():
            rows = np.any(p.data != before[name], axis=1) if "_A" in name else np.any(p.data != before[name], axis=0)
            assert list(np.flatnonzero(rows)) == ([b - 1] if "lora" in name else []), (step, name)


def test_ranks_are_drawn_uniformly_from_the_models_rng_each_step():
    model = get_peft_model(tiny_model(), DyLoraConfig(r=5, r_min=2, target_modules=["q_proj"]), seed=7)
    seen = []
    for step in range(400):
        twin = np.random.Generator(type(model.rng.bit_generator)())
        twin.bit_generator.state = model.rng.bit_generator.state
        model.on_step_end(step)
        seen.append({layer.train_rank["default"] for layer in adapter_layers(model, "default")})
        assert seen[-1] == {int(twin.integers(2, 6))}  # one draw from PeftModel.rng, one rank for all layers
    counts = np.bincount([s.pop() for s in seen], minlength=6)
    assert counts[:2].sum() == 0 and all(70 <= c <= 130 for c in counts[2:]), counts


def test_set_rank_eval_rank_config_and_errors(tmp_path):
    model, ids = dylora(eval_rank=3), token_ids()
    assert {layer.eval_rank["default"] for layer in adapter_layers(model, "default")} == {3}
    at3 = logits(model.eval(), ids)
    model.set_rank(5)
    assert model.peft_config["default"].eval_rank == 5 and not np.allclose(logits(model, ids), at3)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "DYLORA"
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    np.testing.assert_array_equal(logits(loaded, ids), logits(model, ids))  # eval_rank 5 travels with the config
    loaded.set_rank(3)
    np.testing.assert_array_equal(logits(loaded, ids), at3)
    loaded.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        loaded.set_rank(2)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 6\]"):
        model.set_rank(7)
    with pytest.raises(ValueError, match="combines LoRA adapters only"):  # its factors hold r_max adapters
        model.add_weighted_adapter(["default"], [1.0], "sum", combination_type="cat")
    with pytest.raises(ValueError, match="needs a DyLoRA adapter"):
        get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"])).set_rank(2)
    for bad, field in (({"r_min": 7}, "r_min"), ({"eval_rank": 0}, "eval_rank"), ({"use_dora": True}, "use_dora"),
                       ({"rank_pattern": {"q_proj": 2}}, "rank_pattern")):
        with pytest.raises(ValueError, match=field):
            DyLoraConfig(r=6, **bad)


def test_loss_per_rank_restores_the_eval_rank():
    model = dylora()
    data = build_dataset([Record("", "abcabc" * 3, f"m{i}") for i in range(3)], CharTokenizer(), 24)
    config = model.peft_config["default"]
    losses = loss_per_rank(model, lambda m: evaluate(m, data)["eval_loss"], range(1, 7))
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and len(set(losses.values())) == 6
    assert model.peft_config["default"] is config
    assert {layer.eval_rank["default"] for layer in adapter_layers(model, "default")} == {6}
    assert format_rank_table(losses).splitlines()[0].split() == ["rank", "eval", "loss", "perplexity"]


def test_a_resumed_run_continues_exactly(tmp_path):
    """The rank of the next step is saved (dylora_state.json) and restored with the checkpoint."""
    data = build_dataset([Record("", t, f"m{i}") for i, t in enumerate(["abcab", "bca", "cabcabc", "ab"])],
                         CharTokenizer(), 16)

    def make(ranks):
        model = get_peft_model(tiny_model(1), DyLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules=["q_proj", "v_proj"]), seed=5)
        real_mask, real_end = model.mask_gradients, model.on_step_end

        def mask(step):  # record the rank each step ran at
            ranks[step] = adapter_layers(model, "default")[0].train_rank["default"]
            real_mask(step)

        def end(step):
            real_end(step)
            if step == 4 and ranks.get("kill"):
                raise KeyboardInterrupt
        model.mask_gradients, model.on_step_end = mask, end
        return model

    def args(folder):
        return TrainingArguments(str(folder), max_steps=6, batch_size=2, lr=1e-2, save_every=2, progress=False,
                                 seq_len=16, schedule="constant")

    seen, ranks = {}, {}
    straight = make(seen)
    Trainer(straight, args(tmp_path / "a"), data).train()
    with pytest.raises(KeyboardInterrupt):
        Trainer(make({"kill": True}), args(tmp_path / "b"), data).train()
    resumed = make(ranks)
    assert adapter_layers(resumed, "default")[0].train_rank["default"] != seen[4]  # a fresh draw would differ
    Trainer(resumed, args(tmp_path / "b"), data).train(resume=True)
    assert ranks == {4: seen[4], 5: seen[5]}
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(a.data, b.data), name


def test_cli_train_table_and_rank_on_generate_and_merge(capsys, tmp_path):
    data, out = small_data(tmp_path), tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", data, "--out", out, "--method", "dylora", "--r-min", 1,
                            "--r", 4, "--dylora-frozen", *TRAIN)
    assert code == 0, err
    table = stdout.splitlines()[-5:]
    assert table[0].split()[0] == "rank" and [int(line.split()[0]) for line in table[1:]] == [1, 2, 3, 4]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "DYLORA" and config["frozen"] is True and config["r"] == 4
    prompt = ("--prompt", "Once", "--max-new-tokens", 8)
    code, at2, err = run(capsys, "generate", "--adapter", out, "--rank", 2, *prompt)
    assert code == 0, err
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--rank", 2, "--out", tmp_path / "m")
    assert code == 0, err
    code, merged, err = run(capsys, "generate", "--model", tmp_path / "m", *prompt)
    assert code == 0 and merged == at2  # the merged model is the adapter at rank 2
    code, _, err = run(capsys, "merge", "--adapter", out, "--rank", 9, "--out", tmp_path / "m9")
    assert code == 1 and "rank must be an integer in [1, 4]" in err
