"""The ``minipeft`` command line, run in-process (and once as ``python -m minipeft``):
results on stdout, information on stderr, bad input as one ``minipeft: error:`` line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minipeft as mp
from minipeft.cli import main

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "models" / "golden" / "stories260K_greedy_bos.txt"


@pytest.fixture(scope="module")
def bundled():
    path = mp.bundled_model_path()
    return mp.LlamaForCausalLM.from_pretrained(path), mp.Tokenizer.from_pretrained(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_prompt_and_greedy_continuation(capsys, bundled):
    model, tok = bundled
    prompt = "Once upon a time"
    code, out, err = run(capsys, "generate", "--prompt", prompt, "--max-new-tokens", "20")
    assert code == 0
    ids = tok.encode(prompt)
    full = model.generate(np.array([ids]), max_new_tokens=20, temperature=0.0)[0]
    assert len(full) == len(ids) + 20
    expected = tok.decode(full)
    assert expected.startswith(prompt) and len(expected) > len(prompt) + 20
    assert "\n" not in expected
    assert out == expected + "\n"  # exactly one line: prompt + continuation
    assert "tokens/s" in err and "tokens/s" not in out
    assert "20 tokens" in err


def test_empty_prompt_starts_from_bos_and_gives_the_golden_text(capsys):
    code, out, err = run(capsys, "generate", "--max-new-tokens", "30")
    assert code == 0
    line = out.removesuffix("\n")
    assert "\n" not in line and len(line) > 60
    assert GOLDEN.read_text(encoding="utf-8").startswith(line)


def test_sampling_with_a_seed_repeats(capsys):
    args = ("generate", "--prompt", "Tom and Lily", "--max-new-tokens", "40",
            "--temperature", "0.8", "--top-k", "20", "--seed", "3")
    first = run(capsys, *args)
    second = run(capsys, *args)
    assert first[0] == second[0] == 0
    assert first[1] == second[1] and first[1].startswith("Tom and Lily")
    other = run(capsys, *args[:-1], "4")
    assert other[1] != first[1]  # the seed matters


def test_info_prints_layers_and_total(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0
    assert "layers: 5" in out
    assert "260,032" in out
    total = [line for line in out.splitlines() if line.strip().startswith("total")]
    assert len(total) == 1 and total[0].split()[-1] == "260,032"
    assert err == ""


def assert_one_line_error(code, out, err, *needles):
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("minipeft: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.mark.parametrize("command", ["generate", "info"])
def test_missing_model_folder(capsys, tmp_path, command):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(*run(capsys, command, "--model", str(missing)), missing)


@pytest.mark.parametrize("command", ["generate", "info"])
def test_corrupt_model_folder(capsys, tmp_path, command):
    folder = tmp_path / "corrupt"
    shutil.copytree(mp.bundled_model_path(), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated
    assert_one_line_error(*run(capsys, command, "--model", str(folder)), weights, "truncated")


def test_bad_config_in_model_folder(capsys, tmp_path):
    folder = tmp_path / "bad-config"
    shutil.copytree(mp.bundled_model_path(), folder)
    (folder / "config.json").write_text("{\n  \"vocab_size\": 512,\n")
    assert_one_line_error(*run(capsys, "generate", "--model", str(folder)),
                          folder / "config.json", "line")


def test_python_dash_m_generate(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "minipeft", "generate", "--max-new-tokens", "5"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0]
    assert GOLDEN.read_text(encoding="utf-8").startswith(lines[0])
    assert "tokens/s" in result.stderr


@pytest.mark.skipif(mp.backend.gpu_available(), reason="a GPU with CuPy is present: 'cuda' works here")
def test_unusable_devices_are_one_line_errors(capsys):
    for device, words in (("tpu", "unknown device 'tpu'"), ("cuda", "needs CuPy")):
        code, out, err = run(capsys, "generate", "--device", device, "--max-new-tokens", "2")
        assert code == 1 and out == ""
        assert err.startswith("minipeft: error:") and words in err and err.count("\n") == 1


def test_info_describes_an_adapter(capsys, tmp_path):
    import minipeft as mp  # noqa: PLC0415

    base = mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path())
    mp.peft.get_peft_model(base, mp.peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    code, out, err = run(capsys, "info", "--adapter", str(tmp_path))
    assert code == 0, err
    assert "method: LORA (mergeable: yes)" in out and "r: 4" in out
    assert "target_modules: ['q_proj', 'v_proj']" in out
    # 5 layers x (q: 4·(64 + 64) + v: 4·(64 + 32)) = 4,480 on 260,032 base parameters
    assert "trainable params: 4,480 || all params: 264,512 || trainable%: 1.6937" in out
