"""Bottleneck adapters and AdapterFusion against the ``adapters`` library 1.3.0, files both ways.

The library pins transformers ~= 4.57, so it runs in its own virtual environment:
``MINIPEFT_ADAPTERS_PYTHON`` names that environment's python (.ci/run creates it and sets it).
One subprocess runs tests/oracle_adapters/run_adapters.py over a plan of jobs on a base model
minipeft saved (an HF folder transformers reads): the library loads our folders, and writes its
own for us to load; both sides' logits are compared.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minipeft.peft import AdapterFusionConfig, DoubleSeqBnConfig, PeftModel, SeqBnConfig, get_peft_model
from tests.peft.helpers import logits, randomize, tiny_model, token_ids

SCRIPT = Path(__file__).resolve().parents[2] / "oracle_adapters" / "run_adapters.py"
ENV = "MINIPEFT_ADAPTERS_PYTHON"

OURS = {  # configs we save and the library loads
    "seq_bn": SeqBnConfig(),
    "double_seq_bn": DoubleSeqBnConfig(),
    "seq_bn_gelu": SeqBnConfig(non_linearity="gelu", scaling=0.5, reduction_factor=8),
    "double_relu_dict_leave_out": DoubleSeqBnConfig(non_linearity="relu", scaling=2.0, leave_out=[1],
                                                    reduction_factor={"0": 4, "default": 16}),
    "seq_bn_residual_after": SeqBnConfig(residual_before_ln=False, non_linearity="gelu_new"),
}
THEIRS = {  # the library's configs we load
    "seq_bn": "seq_bn", "double_seq_bn": "double_seq_bn",
    "custom": {"architecture": None, "mh_adapter": True, "output_adapter": True, "reduction_factor": 4,
               "non_linearity": "tanh", "original_ln_before": True, "original_ln_after": True,
               "residual_before_ln": True, "scaling": 0.7},
}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Run every library job once: {job name: the library's logits}, plus our side's data."""
    python = os.environ.get(ENV)
    if not python or not Path(python).exists():
        pytest.skip(f"the adapters library's virtual environment is absent: set {ENV} to its python "
                    "(python -m venv V && V/bin/pip install torch==2.13.0 adapters==1.3.0; .ci/run does this)")
    root = tmp_path_factory.mktemp("adapters_oracle")
    base = tiny_model(0)
    base.save_pretrained(root / "base")
    ids = token_ids(3, batch=2, length=7)
    np.save(root / "ids.npy", ids)
    ours, jobs = {}, [{"kind": "none", "out": str(root / "none.npy")}]
    for i, (name, config) in enumerate(OURS.items()):
        peft_model = get_peft_model(tiny_model(0), config, seed=i)
        randomize(peft_model, seed=i, scale=0.5)
        peft_model.save_pretrained(root / name)
        ours[name] = logits(peft_model.eval(), ids)
        jobs.append({"kind": "load", "adapter": str(root / name), "out": str(root / f"{name}.npy")})
    for name, temperature in (("fusion", False), ("fusion_temperature", True)):
        config = AdapterFusionConfig(adapters=(str(root / "seq_bn"), str(root / "seq_bn_gelu")),
                                     adapter_names=("a", "b"), temperature=temperature)
        peft_model = get_peft_model(tiny_model(0), config, seed=5)
        randomize(peft_model, seed=5, scale=0.5)
        peft_model.save_pretrained(root / name)
        ours[name] = logits(peft_model.eval(), ids)
        jobs.append({"kind": "load_fusion", "fusion": str(root / name), "out": str(root / f"{name}.npy"),
                     "members": [str(root / name / "a"), str(root / name / "b")]})
    for i, (name, config) in enumerate(THEIRS.items()):
        jobs.append({"kind": "make", "name": name, "config": config, "seed": i, "save": str(root / f"lib_{name}"),
                     "out": str(root / f"lib_{name}.npy")})
    jobs.append({"kind": "make_fusion", "members": [["x", "seq_bn"], ["y", "seq_bn"], ["z", "seq_bn"]], "seed": 9,
                 "save": str(root / "lib_fusion"), "out": str(root / "lib_fusion.npy")})
    (root / "plan.json").write_text(json.dumps({"model": str(root / "base"), "ids": str(root / "ids.npy"),
                                                "jobs": jobs}))
    done = subprocess.run([python, str(SCRIPT), str(root / "plan.json")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, ids, ours, base


def close(theirs, mine, what):
    diff = float(np.abs(theirs - mine).max())
    scale = float(np.abs(theirs).max())
    print(f"{what}: max |logit diff| {diff:.2e} (logits up to {scale:.2f})", file=sys.stderr)
    assert diff <= 1e-5 * max(1.0, scale), f"{what}: max |logit diff| {diff:.2e}"


def test_the_base_models_agree(oracle):
    root, ids, _, base = oracle
    close(np.load(root / "none.npy"), logits(base, ids), "no adapter")


@pytest.mark.parametrize("name", [*OURS, "fusion", "fusion_temperature"])
def test_the_library_loads_our_folders_with_our_logits(oracle, name):
    root, _, ours, _ = oracle
    theirs = np.load(root / f"{name}.npy")
    close(theirs, ours[name], f"ours -> library: {name}")
    assert not np.allclose(theirs, np.load(root / "none.npy"), atol=1e-2)  # the adapter does act


@pytest.mark.parametrize("name", [*THEIRS, "fusion"])
def test_we_load_the_librarys_folders_with_its_logits(oracle, name):
    root, ids, _, _ = oracle
    loaded = PeftModel.from_pretrained(tiny_model(0), root / f"lib_{name}")
    close(np.load(root / f"lib_{name}.npy"), logits(loaded, ids), f"library -> ours: {name}")
    assert loaded.get_nb_trainable_parameters()[0] == 0
    loaded.save_pretrained(root / f"again_{name}")  # and back: the same files, the same logits
    again = PeftModel.from_pretrained(tiny_model(0), root / f"again_{name}")
    np.testing.assert_array_equal(logits(again, ids), logits(loaded, ids))
