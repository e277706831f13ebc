"""``minipeft train`` / ``merge`` / ``generate --adapter`` end to end on the bundled model,
and the LoRA example's promise (eval loss goes down) on a short run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import minipeft as mp
from minipeft.cli import main
from minipeft.io.safetensors import read_safetensors

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "zoe_stories.jsonl"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def small_data(tmp_path, n=24) -> Path:
    lines = DATA.read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


TRAIN = ("--steps", 4, "--batch-size", 4, "--seq-len", 128, "--eval-every", 2, "--save-every", 2, "--warmup", 1)


def test_train_merge_generate(capsys, tmp_path):
    data, out = small_data(tmp_path), tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", data, "--out", out, "--method", "lora", *TRAIN)
    assert code == 0, err
    assert "trainable params:" in err and "trainable params:" not in stdout
    assert "eval loss" in stdout and f"adapter: {out}" in stdout
    assert (out / "adapter_config.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in e for e in events)

    code, stdout, err = run(capsys, "generate", "--adapter", out, "--prompt", "Once", "--max-new-tokens", 8)
    assert code == 0 and stdout.startswith("Once")
    adapted = stdout

    merged = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", "--adapter", out, "--out", merged)
    assert code == 0, err
    assert (merged / "tokenizer.json").exists() and (merged / "model.safetensors").exists()
    code, stdout, err = run(capsys, "generate", "--model", merged, "--prompt", "Once", "--max-new-tokens", 8)
    assert code == 0 and stdout == adapted  # merged model == base + adapter


def test_dora_trains_and_saves_magnitude(capsys, tmp_path):
    data, out = small_data(tmp_path), tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", data, "--out", out, "--method", "dora", *TRAIN)
    assert code == 0, err
    tensors = read_safetensors(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)


def test_resume_through_the_cli_equals_one_run(capsys, tmp_path):
    data = small_data(tmp_path)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run(capsys, "train", "--data", data, "--out", whole, *TRAIN)[0] == 0
    # An interrupted run: the same command, stopped after its checkpoint-2.
    assert run(capsys, "train", "--data", data, "--out", split, *TRAIN)[0] == 0
    shutil.rmtree(split / "checkpoint-4")
    for name in ("adapter_config.json", "adapter_model.safetensors", "latest"):  # the interrupted run's ends
        (split / name).unlink()
    code, _, err = run(capsys, "train", "--data", data, "--out", split, *TRAIN, "--resume")
    assert code == 0, err
    a = read_safetensors(whole / "adapter_model.safetensors")
    b = read_safetensors(split / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_malformed_jsonl_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n', encoding="utf-8")
    code, stdout, err = run(capsys, "train", "--data", bad, "--out", tmp_path / "run", "--steps", 1)
    assert code == 1 and stdout == ""
    assert err.startswith("minipeft: error:") and err.count("\n") == 1
    assert "bad.jsonl" in err and "line 3" in err


def test_merge_of_a_misfit_adapter_is_one_clear_line(capsys, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json", encoding="utf-8")
    code, stdout, err = run(capsys, "merge", "--adapter", adapter, "--out", tmp_path / "m")
    assert code == 1 and err.startswith("minipeft: error:") and "adapter_config.json" in err


def test_the_lora_example_lowers_eval_loss(tmp_path):
    """examples/lora_zoe.py in miniature: a short LoRA run on the shipped data lowers eval loss."""
    from minipeft.train import Trainer, TrainingArguments, evaluate, load_datasets

    path = mp.bundled_model_path()
    tok = mp.Tokenizer.from_pretrained(path)
    train, evals = load_datasets(DATA, tok, seq_len=256, eval_fraction=0.1, seed=0)
    model = mp.peft.get_peft_model(mp.LlamaForCausalLM.from_pretrained(path),
                                   mp.peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    before = evaluate(model, evals)["eval_loss"]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=15, batch_size=8, lr=3e-3, seq_len=256,
                             progress=False)
    after = Trainer(model, args, train, evals).train()["eval_loss"]
    assert after < before - 0.02, (before, after)


def test_resuming_a_finished_run_trains_nothing_and_says_so(capsys, tmp_path):
    data, out = small_data(tmp_path), tmp_path / "run"
    assert run(capsys, "train", "--data", data, "--out", out, *TRAIN)[0] == 0
    code, stdout, err = run(capsys, "train", "--data", data, "--out", out, *TRAIN, "--resume")
    assert code == 0, err
    assert "step 4: nothing left to train" in stdout
