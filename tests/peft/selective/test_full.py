"""Full fine-tuning (minipeft/peft/selective/full.py): the baseline every method is compared against.

The contract rows (tests/peft/test_contract.py, "full fine-tuning rows") cover identity, counts,
gradients against finite differences, save / load and two Trainer steps. Here: the gradients are
the bare model's, one Trainer step is torch.optim.AdamW's step, the saved folder is a model that
transformers loads, merge_and_unload hands the trained model back, bad input, and the CLI (train,
resume, generate from the folder).
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.backend import to_numpy
from minipeft.cli import main
from minipeft.errors import CheckpointError, ConfigError
from minipeft.io.safetensors import read_safetensors
from minipeft.peft import FullFineTuningConfig, PeftModel, get_peft_model
from minipeft.train import Trainer, TrainingArguments
from minipeft.train.data import Dataset, Example
from tests.peft.helpers import hf_model, import_oracles, logits, tiny_model, token_ids

REPO = Path(__file__).resolve().parents[3]
ZOE = REPO / "examples" / "data" / "zoe_stories.jsonl"


def loss_and_grads(model, ids, labels) -> tuple[float, dict]:
    model.zero_grad()
    loss = model(ids, labels=labels).loss
    loss.backward()
    return float(loss.item()), {n: to_numpy(p.grad).copy() for n, p in model.named_parameters()}


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), tied=st.booleans())
def test_gradients_are_the_whole_models_gradients(seed, tied):
    """Wrapping changes nothing about backward: every parameter's gradient is the bare model's, bitwise."""
    ids, labels = token_ids(seed), token_ids(seed + 1)
    bare_loss, bare = loss_and_grads(tiny_model(seed, tie_word_embeddings=tied), ids, labels)
    peft_model = get_peft_model(tiny_model(seed, tie_word_embeddings=tied), FullFineTuningConfig())
    loss, grads = loss_and_grads(peft_model, ids, labels)
    assert loss == bare_loss
    assert {n.removeprefix("base_model.model.") for n in grads} == set(bare)
    for name, g in grads.items():
        np.testing.assert_array_equal(g, bare[name.removeprefix("base_model.model.")], err_msg=name)


def test_one_trainer_step_is_torch_adamws_step(tmp_path):
    """Oracle: one update through the Trainer (no clipping, constant LR) equals torch.optim.AdamW's
    step from the same weights with the same gradients (those of the bare model on the batch)."""
    torch = pytest.importorskip("torch", reason="torch not installed (torch.optim.AdamW is the oracle)")
    ids = token_ids(7, batch=1, length=10)
    data = Dataset([Example(ids[0], ids[0].copy(), "row 0")], pad_id=0, seq_len=10)
    lr, betas, eps, wd = 3e-3, (0.8, 0.95), 1e-6, 0.1
    _, grads = loss_and_grads(tiny_model(3), ids, ids)  # the gradients of the step, from the bare model
    start = dict(tiny_model(3).state_dict())

    peft_model = get_peft_model(tiny_model(3), FullFineTuningConfig())
    args = TrainingArguments(str(tmp_path), max_steps=1, batch_size=1, lr=lr, adam_betas=betas, adam_eps=eps,
                             weight_decay=wd, schedule="constant", max_grad_norm=None, seq_len=10, progress=False)
    Trainer(peft_model, args, data).train()

    params = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in start.items()}
    for n, p in params.items():
        p.grad = torch.from_numpy(grads[n])
    torch.optim.AdamW(params.values(), lr=lr, betas=betas, eps=eps, weight_decay=wd).step()
    trained = peft_model.get_base_model().state_dict()
    for name, p in params.items():
        expected = p.detach().numpy()
        assert not np.array_equal(expected, start[name]), name
        np.testing.assert_allclose(trained[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)


def trained_model(tmp_path, steps=2, **model):
    peft_model = get_peft_model(tiny_model(0, **model), FullFineTuningConfig())
    ids = token_ids(5, batch=4, length=8)
    data = Dataset([Example(r, r.copy(), f"row {i}") for i, r in enumerate(ids)], pad_id=0, seq_len=8)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=steps, batch_size=2, lr=1e-2, seq_len=8,
                             progress=False)
    Trainer(peft_model, args, data).train()
    return peft_model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_the_saved_folder_is_a_model_transformers_loads(tmp_path, tied):
    """Oracle: save_pretrained writes config.json + model.safetensors; transformers' logits equal ours."""
    torch, _, _ = import_oracles()
    peft_model = trained_model(tmp_path, tie_word_embeddings=tied)
    peft_model.save_pretrained(tmp_path / "out")
    assert {"config.json", "model.safetensors", "full_finetune.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert not (tmp_path / "out" / "adapter_config.json").exists()  # transformers would take it for a PEFT adapter
    ids = token_ids(9)
    with torch.no_grad():
        theirs = hf_model(tmp_path / "out")(torch.from_numpy(ids)).logits.numpy()
    ours = logits(peft_model, ids)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    # and the folder is a model folder for minipeft too
    np.testing.assert_array_equal(logits(mp.LlamaForCausalLM.from_pretrained(tmp_path / "out"), ids), ours)


def test_from_pretrained_then_merge_and_unload_gives_the_trained_model(tmp_path):
    peft_model = trained_model(tmp_path)
    peft_model.save_pretrained(tmp_path / "out")
    expected = logits(peft_model, token_ids())
    base = tiny_model(0)
    loaded = PeftModel.from_pretrained(base, tmp_path / "out")
    assert loaded.peft_config["default"].peft_type == "FULL" and loaded.get_nb_trainable_parameters()[0] == 0
    merged = loaded.merge_and_unload()
    assert merged is base and not hasattr(merged, "full_finetune")
    assert all(p.requires_grad for p in merged.parameters())
    np.testing.assert_array_equal(logits(merged, token_ids()), expected)


def test_a_folder_of_another_model_is_refused_naming_the_field(tmp_path):
    get_peft_model(tiny_model(0), FullFineTuningConfig()).save_pretrained(tmp_path / "out")
    other = tiny_model(0, intermediate_size=40)
    before = {n: p.data.copy() for n, p in other.named_parameters()}
    with pytest.raises(CheckpointError, match="intermediate_size"):
        PeftModel.from_pretrained(other, tmp_path / "out")
    for name, p in other.named_parameters():
        np.testing.assert_array_equal(p.data, before[name], err_msg=name)


def test_a_missing_weight_is_named(tmp_path):
    get_peft_model(tiny_model(0), FullFineTuningConfig()).save_pretrained(tmp_path / "out")
    from minipeft.io.safetensors import write_safetensors  # noqa: PLC0415

    tensors = read_safetensors(tmp_path / "out" / "model.safetensors")
    del tensors["model.norm.weight"]
    write_safetensors(tmp_path / "out" / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        PeftModel.from_pretrained(tiny_model(0), tmp_path / "out")


def test_a_second_full_adapter_is_refused():
    peft_model = get_peft_model(tiny_model(0), FullFineTuningConfig())
    with pytest.raises(ConfigError, match="already has a full fine-tuning adapter"):
        peft_model.add_adapter("again", FullFineTuningConfig())


def test_disable_adapter_warns_that_there_is_no_base_to_return_to():
    peft_model = get_peft_model(tiny_model(0), FullFineTuningConfig())
    with pytest.warns(UserWarning, match="cannot give the base model back"):
        with peft_model.disable_adapter():
            assert peft_model.get_nb_trainable_parameters()[0] == 0
    assert peft_model.get_nb_trainable_parameters()[0] == peft_model.get_nb_trainable_parameters()[1]


# ----- the command line ------------------------------------------------------------------------
TRAIN = ("--method", "full", "--steps", 4, "--batch-size", 4, "--seq-len", 128, "--save-every", 2,
         "--eval-every", 2, "--warmup", 1, "--lr", 1e-3)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_cli_trains_resumes_and_the_folder_generates(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(ZOE.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")
    whole, split = tmp_path / "whole", tmp_path / "split"
    out = cli(capsys, "train", "--data", data, "--out", whole, *TRAIN)
    assert "eval loss" in out and (whole / "full_finetune.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cli(capsys, "train", "--data", data, "--out", split, *TRAIN)
    shutil.rmtree(split / "checkpoint-4")  # the same run, stopped after its checkpoint-2
    for name in ("model.safetensors", "config.json", "full_finetune.json", "latest"):
        (split / name).unlink()
    cli(capsys, "train", "--data", data, "--out", split, *TRAIN, "--resume")
    a, b = read_safetensors(whole / "model.safetensors"), read_safetensors(split / "model.safetensors")
    base = read_safetensors(Path(mp.bundled_model_path()) / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert all(not np.array_equal(a[k], base[k]) for k in a)  # every weight trained
    adapted = cli(capsys, "generate", "--adapter", whole, "--prompt", "Once", "--max-new-tokens", 8)
    # the base folder's tokenizer came along, so the folder is a whole model for --model
    assert (whole / "tokenizer.json").read_bytes() == (Path(mp.bundled_model_path()) / "tokenizer.json").read_bytes()
    as_model = cli(capsys, "generate", "--model", whole, "--prompt", "Once", "--max-new-tokens", 8)
    assert adapted == as_model and adapted.startswith("Once")
