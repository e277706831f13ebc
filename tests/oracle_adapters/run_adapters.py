"""The ``adapters`` library (adapter-hub/adapters 1.3.0) as an oracle for minipeft's bottleneck
adapters and AdapterFusion. Runs in ITS OWN Python (it pins transformers ~= 4.57, the main test
environment has 5.x): tests/peft/additive/test_oracle_adapters.py calls

    $MINIPEFT_ADAPTERS_PYTHON tests/oracle_adapters/run_adapters.py PLAN.json

PLAN: {"model": HF folder, "ids": .npy of token ids, "jobs": [...]}; each job writes the logits of
``LlamaForCausalLM(model)`` with the library's adapters active to job["out"] (.npy, float32):
  {"kind": "none"}                                        no adapter
  {"kind": "load", "adapter": DIR}                        model.load_adapter(DIR, use_safetensors=True)
  {"kind": "load_fusion", "fusion": DIR, "members": [DIR, ...]}   members, then load_adapter_fusion(DIR)
  {"kind": "make", "name": N, "config": preset or dict, "seed": S, "save": DIR}
        add_adapter, every adapter parameter ~ N(0, 0.5²), save_adapter(DIR, use_safetensors=True)
  {"kind": "make_fusion", "members": [[N, config], ...], "seed": S, "save": DIR}
        members and Fuse(...) as above (fusion parameters too), members saved in DIR/<N>, fusion in DIR
"""
import json
import os
import sys

import numpy as np
import torch

import adapters
from adapters import Fuse
from transformers import LlamaForCausalLM


def fresh(folder):
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    adapters.init(model)
    return model


def randomize(model, seed, names):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(f".adapters.{name}." in n or f".adapter_fusion_layer.{name}." in n for name in names):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def run(job, folder, ids):
    model = fresh(folder)
    kind = job["kind"]
    if kind == "load":
        model.load_adapter(job["adapter"], use_safetensors=True, set_active=True)
    elif kind == "load_fusion":
        names = [model.load_adapter(d, use_safetensors=True) for d in job["members"]]
        model.load_adapter_fusion(job["fusion"], use_safetensors=True)
        model.set_active_adapters(Fuse(*names))
    elif kind == "make":
        model.add_adapter(job["name"], config=job["config"])
        randomize(model, job["seed"], [job["name"]])
        model.set_active_adapters(job["name"])
        model.save_adapter(job["save"], job["name"], use_safetensors=True)
    elif kind == "make_fusion":
        names = [name for name, _ in job["members"]]
        for name, config in job["members"]:
            model.add_adapter(name, config=config)
        model.add_adapter_fusion(Fuse(*names))
        randomize(model, job["seed"], names + [",".join(names)])
        model.set_active_adapters(Fuse(*names))
        os.makedirs(job["save"], exist_ok=True)
        for name in names:
            model.save_adapter(f"{job['save']}/{name}", name, use_safetensors=True)
        model.save_adapter_fusion(job["save"], ",".join(names), use_safetensors=True)
    model.eval()
    with torch.no_grad():
        np.save(job["out"], model(ids).logits.numpy())


def main(path):
    plan = json.load(open(path))
    ids = torch.tensor(np.load(plan["ids"]))
    for job in plan["jobs"]:
        run(job, plan["model"], ids)
    print("adapters", adapters.__version__, "ran", len(plan["jobs"]), "jobs")


if __name__ == "__main__":
    main(sys.argv[1])
