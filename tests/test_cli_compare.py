"""``minipeft compare`` (minipeft/cli/compare.py) and its measuring (minipeft/train/compare.py):
two methods x two steps on the bundled model with a few stories."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

import minipeft as mp
from minipeft.cli import build_parser, main
from minipeft.cli import compare as compare_cli
from minipeft.cli.train import method_choices
from minipeft.errors import ConfigError
from minipeft.peft import REGISTRY, PeftModel
from minipeft.train import compare as measure
from minipeft.train import evaluate, load_datasets

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "zoe_stories.jsonl"
FAST = ("--steps", 2, "--batch-size", 4, "--seq-len", 64, "--eval-every", 1, "--warmup", 1, "--timing-repeats", 1,
        "--eval-fraction", 0.25)


def small_data(tmp_path, n=12) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(DATA.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_two_methods_two_steps_table_csv_plots_and_runs(capsys, tmp_path):
    data, out = small_data(tmp_path), tmp_path / "cmp"
    code, stdout, err = run(capsys, "compare", "--data", data, "--methods", "lora,full", "--out", out,
                            "--lr", "full=5e-4", *FAST)
    assert code == 0, err
    assert stdout.count("\n| lora | low-rank |") == 1 and stdout.count("\n| full | full |") == 1
    assert stdout.endswith((out / "comparison.md").read_text(encoding="utf-8").split("\n\n", 1)[1])
    rows = {r["name"]: r for r in csv.DictReader(open(out / "comparison.csv", encoding="utf-8"))}
    assert list(rows) == ["lora", "full"]
    base = mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path())
    everything = sum(p.size for p in base.parameters())  # the tied embedding / head once
    assert int(rows["full"]["trainable"]) == int(rows["lora"]["base_params"]) == everything
    assert float(rows["full"]["percent"]) == 100.0 and float(rows["full"]["lr"]) == 5e-4
    lora = mp.peft.get_peft_model(base, mp.peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert int(rows["lora"]["trainable"]) == lora.get_nb_trainable_parameters()[0]  # train's defaults
    assert float(rows["lora"]["lr"]) == measure.DEFAULT_LR["lora"]
    for r in rows.values():
        assert float(r["peak_bytes"]) > 0 and float(r["seconds_per_step"]) > 0
        assert np.isclose(float(r["perplexity"]), np.exp(float(r["eval_loss"])))
    assert rows["lora"]["inference_cost"].startswith("0 merged (")
    # the reported eval loss is the saved run's: reload OUT/<method> and evaluate the same held-out split
    tok = mp.Tokenizer.from_pretrained(mp.bundled_model_path())
    _, evals = load_datasets(data, tok, 64, eval_fraction=0.25, seed=0)
    fresh = mp.LlamaForCausalLM.from_pretrained(mp.bundled_model_path())
    again = evaluate(PeftModel.from_pretrained(fresh, out / "full"), evals, 4)["eval_loss"]
    assert again == pytest.approx(float(rows["full"]["eval_loss"]), rel=1e-6)
    assert (out / "lora" / "adapter_config.json").exists() and (out / "full" / "full_finetune.json").exists()
    pytest.importorskip("matplotlib")
    assert (out / "loss_vs_steps.png").stat().st_size > 0 and (out / "loss_vs_params.png").stat().st_size > 0


def test_every_offered_method_is_in_a_family_and_has_a_rate(capsys):
    for name, (method, _) in method_choices().items():
        assert measure.family(method) in ("low-rank", "additive", "selective", "full"), name
    assert measure.family(REGISTRY["LORA"]) == "low-rank" and measure.family(REGISTRY["IA3"]) == "additive"
    assert measure.family(REGISTRY["FULL"]) == "full"
    # the default: every method whose config builds from the defaults (fusion needs adapters to fuse: skipped)
    args = build_parser().parse_args(["compare", "--data", "unused.jsonl"])
    names = [c.name for c in compare_cli.candidates(args)]
    assert names == [n for n in method_choices() if n != "fusion"]
    assert "skipping fusion" in capsys.readouterr().err


def test_learning_rates_from_the_table_and_overrides():
    rates = compare_cli.learning_rates([], ["lora", "full", "zzz"])
    assert rates == {"lora": measure.DEFAULT_LR["lora"], "full": measure.DEFAULT_LR["full"],
                     "zzz": measure.FALLBACK_LR}
    assert compare_cli.learning_rates(["0.01", "full=1e-4"], ["lora", "full"]) == {"lora": 0.01, "full": 1e-4}
    with pytest.raises(ConfigError, match="'dora' is not among --methods"):
        compare_cli.learning_rates(["dora=1e-3"], ["lora"])
    with pytest.raises(ConfigError, match="NAME=RATE"):
        compare_cli.learning_rates(["lora=fast"], ["lora"])
    with pytest.raises(ConfigError, match="positive"):
        compare_cli.learning_rates(["lora=-1"], ["lora"])


def test_an_unknown_method_is_one_line_naming_the_choices(capsys, tmp_path):
    code, stdout, err = run(capsys, "compare", "--data", small_data(tmp_path), "--methods", "lora,nope",
                            "--out", tmp_path / "cmp", *FAST)
    assert code == 1 and stdout == "" and err.count("\n") == 1
    assert "nope" in err and "lora" in err and not (tmp_path / "cmp").exists()


def test_without_matplotlib_there_are_no_plots(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    result = measure.Result("x", "full", 1e-3, 1, 1, 1, 0.1, 1.0, 1.0, np.e, 0.0, True, [(0, 2.0), (1, 1.0)])
    assert measure.plot([result], tmp_path) is False and not list(tmp_path.iterdir())
    assert result.inference_cost() == "0 merged (+0% unmerged)"
    unmergeable = measure.Result("p", "additive", 0.3, 1, 2, 1, 0.1, 1.0, 1.0, np.e, 0.25, False)
    assert unmergeable.inference_cost() == "n/a (cannot merge); +25% unmerged"


def test_a_method_that_fails_is_reported_and_the_others_still_run(monkeypatch, tmp_path):
    from minipeft.train import TrainingError  # noqa: PLC0415

    def fake_run(candidate, *args):
        if candidate.name == "bad":
            raise TrainingError("step 2: the training loss is nan")
        return candidate.name

    monkeypatch.setattr(measure, "run_method", fake_run)
    cands = [measure.Candidate(n, REGISTRY["FULL"], None, 1e-3) for n in ("bad", "good")]
    failures = []
    results = measure.compare(cands, lambda: None, None, None, measure.CompareSettings(), tmp_path,
                              on_failure=lambda name, error: failures.append((name, str(error))))
    assert results == ["good"] and failures == [("bad", "step 2: the training loss is nan")]
    with pytest.raises(TrainingError):
        measure.compare(cands, lambda: None, None, None, measure.CompareSettings(), tmp_path)
