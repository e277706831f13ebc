"""Shared pieces of the training tests: a character tokenizer, a tiny LLaMA, a fake adapter.

Import as ``from tests.train.train_helpers import ...``.
"""
from __future__ import annotations

import json

import numpy as np
import minipeft as mp
from minipeft.autograd import Tensor
from minipeft.nn import Module, Parameter, ParameterGroup

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


class CharTokenizer:
    """One id per character (3 + code point mod 61); BOS 1 is added like the LLaMA tokenizer does."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, pad_token_id=None):
        self.pad_token_id = pad_token_id

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_token_id] if add_special_tokens else []) + [3 + ord(c) % 61 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


def tiny_model(seed=0):
    return mp.LlamaForCausalLM(mp.LlamaConfig(**TINY), rng=np.random.default_rng(seed))


class FakeAdapter(Module):
    """A stand-in for a PeftModel: a frozen base plus a trainable bias on the logits.

    It uses every hook the trainer knows: parameter_groups, regularizer, mask_gradients,
    on_step_end, save_pretrained, and ``rng`` (a dropout on the bias, so resuming must
    restore the generator too).
    """

    def __init__(self, seed=0, fail_at_step=None):
        self.base = tiny_model(seed)
        self.base.requires_grad_(False)
        self.bias = Parameter(np.zeros(TINY["vocab_size"], np.float32))
        self.scale = Parameter(np.ones(TINY["vocab_size"], np.float32))
        self.rng = np.random.default_rng(123)
        self.calls = []
        self.fail_at_step = fail_at_step

    def parameter_groups(self):
        return [ParameterGroup("fake:bias", [self.bias]), ParameterGroup("fake:scale", [self.scale], lr=0.01)]

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = self.base(input_ids, attention_mask=attention_mask)
        keep = (self.rng.random(TINY["vocab_size"]) > 0.1).astype(np.float32) / 0.9 if self.training else 1.0
        logits = out.logits * self.scale + self.bias * Tensor(np.asarray(keep, np.float32))
        loss = None
        if labels is not None:
            from minipeft.autograd.fused import cross_entropy
            from minipeft.models.llama import shift_labels
            loss = cross_entropy(logits, shift_labels(np.asarray(labels)))
        return type(out)(logits=logits, loss=loss)

    def regularizer(self):
        return (self.bias * self.bias).sum() * 1e-3

    def mask_gradients(self, step):
        self.calls.append(("mask", step))

    def on_step_end(self, step):
        self.calls.append(("end", step))
        if self.fail_at_step is not None and step == self.fail_at_step:
            raise KeyboardInterrupt("simulated kill")

    def save_pretrained(self, folder):
        from minipeft.io import write_safetensors
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / "adapter_model.safetensors", {"bias": self.bias.data, "scale": self.scale.data})


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path
