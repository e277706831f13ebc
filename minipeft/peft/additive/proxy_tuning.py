"""Proxy-tuning: steer an untouched model at decode time with a small tuned model's logit shift.

Liu, Han, Wang, Tsvetkov, Choi and Smith (2024), "Tuning Language Models by Proxy",
arXiv:2401.08565; the authors' code is alisawuffles/proxy-tuning, modeling/dexperts.py
(``DExpertsLlama``).

Three causal LMs read the same prefix x_<t: the base M (large, untuned), the expert M+
(small, tuned) and the anti-expert M− (the same small model, untuned). Each keeps its own
KV cache; at step t their last-position logits, (B, V) per model, are combined (paper eq. 1)::

    z_t = z_M(x_<t) + α · (z_M+(x_<t) − z_M−(x_<t))          (B, V_base)
    x_t ~ softmax(z_t)   (argmax by default; temperature, top-k, top-p as in ``generate``)

The difference z_M+ − z_M− is what tuning taught the small model; added to the base's
logits it moves the base's distribution the same way, without touching a weight of M.
α = 1 in the paper; α > 1 pushes harder, α < 0 steers away.

Parameters added: none (0 trainable here); the tuning lives in the expert, which may be a
plain fine-tuned model or a small model plus an adapter (a ``PeftModel``).
Identity: α = 0, or an expert that equals the anti-expert, leaves z_t = z_M exactly
(z_M+ − z_M− is exactly 0: the same weights on the same ids give the same logits), so the
base alone decodes: the same greedy ids and the same distribution at every step.
Merge: none. The three models stay separate: the combination is of their outputs, and no
change of M's weights reproduces a shift that depends on two other networks' activations.
Space: combining log-probabilities instead of raw logits gives the same distribution:
log-softmax subtracts one constant c per row from each model's logits, so the combined
row moves by c_M + α(c_M+ − c_M−), also one constant, which softmax ignores.
``combine_logits(..., space="logprobs")`` shows it (and a test proves it).

Vocabularies: the expert's and anti-expert's logits are cut to the base's width, as the
authors do (``expert_next_token_logits[:, :base_next_token_logits.shape[-1]]``): a tuned
chat model often adds a token or two at the end. This is only right when every id below
the base's width names the same token in all three models; the authors assume one shared
tokenizer. Here ``ProxyTuning(..., tokenizers=(base, expert, anti))`` (optional) and
``ProxyTuning.from_folders`` (always: each folder's tokenizer.json) refuse tokenizers that
disagree with a ConfigError: a different tokenization model, or a different token string
at any id the combination uses. A model narrower than the base is refused too.

Departures from the authors' code: all three models see the same prompt ids (the authors
reformat the expert's prompt as chat when "chat" is in its path: format the prompt
yourself); sampling is ``generate``'s (temperature, top-k, top-p, stop ids from the base's
generation_config.json, left-padded batches) with no other logits processors; the logits
are combined in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError
from ...models.generation import check_prompt, decode, model_step, pad_id_of, stop_ids_of

SPACES = ("logits", "logprobs")


@dataclass(frozen=True)
class ProxyTuningConfig:
    alpha: float = 1.0  # the paper's α: how far the expert's shift moves the base
    space: str = "logits"  # combine raw logits (as the authors) or log-probabilities: same softmax

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"ProxyTuningConfig.alpha must be a finite number, got {self.alpha!r}")
        if self.space not in SPACES:
            raise ConfigError(f"ProxyTuningConfig.space must be 'logits' or 'logprobs', got {self.space!r}")


def log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def combine_logits(z_base, z_expert, z_anti, alpha: float = 1.0, space: str = "logits") -> np.ndarray:
    """z = z_base + α (z_expert − z_anti), float64 (B, V_base); the expert's and anti-expert's
    columns beyond the base's width V_base are cut off first."""
    width = z_base.shape[-1]
    for role, z in (("expert", z_expert), ("antiexpert", z_anti)):
        if z.shape[-1] < width:
            raise ConfigError(f"the {role}'s logits have {z.shape[-1]} columns, fewer than the base's {width}")
    z_base, z_expert, z_anti = (np.asarray(z[..., :width], dtype=np.float64) for z in (z_base, z_expert, z_anti))
    if space == "logprobs":
        z_base, z_expert, z_anti = log_softmax(z_base), log_softmax(z_expert), log_softmax(z_anti)
    elif space != "logits":
        raise ConfigError(f"space must be 'logits' or 'logprobs', got {space!r}")
    return z_base + alpha * (z_expert - z_anti)


def tokenizer_mismatch(a, b, vocab_size: int) -> str | None:
    """Why tokenizers ``a`` and ``b`` would read ids below ``vocab_size`` differently (None: they agree)."""
    kind_a, kind_b = type(a.backend.model).__name__, type(b.backend.model).__name__
    if kind_a != kind_b:
        return f"tokenization models differ ({kind_a} vs {kind_b})"
    for i in range(vocab_size):  # a few ms for a 32k vocabulary
        token_a, token_b = a.backend.id_to_token(i), b.backend.id_to_token(i)
        if token_a != token_b:
            return f"id {i} is {token_a!r} in one and {token_b!r} in the other"
    return None


class ProxyTuning:
    """``base`` steered by ``expert`` − ``antiexpert`` (each a LlamaForCausalLM or a PeftModel)."""

    def __init__(self, base, expert, antiexpert, alpha: float = 1.0, space: str = "logits", tokenizers=None):
        self.config = ProxyTuningConfig(alpha, space)
        self.base, self.expert, self.antiexpert = base, expert, antiexpert
        width = base.config.vocab_size
        for role, model in (("expert", expert), ("antiexpert", antiexpert)):
            if model.config.vocab_size < width:
                raise ConfigError(f"the {role}'s vocab_size {model.config.vocab_size} is smaller than the base's "
                                  f"{width}: its logits cannot be cut to the base's vocabulary")
        self.tokenizer = None
        if tokenizers is not None:
            if len(tokenizers) != 3:
                raise ConfigError("tokenizers must be (base, expert, antiexpert) tokenizers")
            self.tokenizer = tokenizers[0]
            for role, tok in zip(("expert", "antiexpert"), tokenizers[1:]):
                why = tokenizer_mismatch(tokenizers[0], tok, width)
                if why is not None:
                    raise ConfigError(f"the {role}'s tokenizer differs from the base's: {why}; proxy-tuning "
                                      "needs one vocabulary (the same token at every id)")

    @classmethod
    def from_folders(cls, base, expert, antiexpert, expert_adapter=None, alpha: float = 1.0,
                     space: str = "logits", device: str = "cpu") -> "ProxyTuning":
        """Load three Hugging Face model folders (and a PEFT adapter folder for the expert);
        each folder's tokenizer.json must agree with the base's."""
        from ...io.tokenizer import Tokenizer  # noqa: PLC0415 - only when loading folders
        from ...models import LlamaForCausalLM  # noqa: PLC0415
        from ..core.peft_model import PeftModel  # noqa: PLC0415

        tokenizers = [Tokenizer.from_pretrained(f) for f in (base, expert, antiexpert)]
        models = [LlamaForCausalLM.from_pretrained(f, device=device) for f in (base, expert, antiexpert)]
        if expert_adapter is not None:
            models[1] = PeftModel.from_pretrained(models[1], expert_adapter)
        return cls(*models, alpha=alpha, space=space, tokenizers=tokenizers)

    def next_logits(self, use_cache: bool = True):
        """The decoding callback: the three models' steps (each with its own KV cache), combined."""
        steps = [model_step(m, use_cache) for m in (self.base, self.expert, self.antiexpert)]

        def step(step_ids, mask, positions):
            z_base, z_expert, z_anti = (s(step_ids, mask, positions) for s in steps)
            return combine_logits(z_base, z_expert, z_anti, self.config.alpha, self.config.space)

        return step

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 64, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed=None, eos_token_id=None,
                 pad_token_id: int | None = None, use_cache: bool = True, **options) -> np.ndarray:
        """Host ids (B, T + n), with the arguments of :func:`minipeft.models.generation.generate`
        (``options``: do_sample, repetition_penalty, streamer, ...); stop and pad ids default to the base model's."""
        ids, mask = check_prompt(input_ids, attention_mask)
        stop = stop_ids_of(self.base, eos_token_id)
        pad = pad_id_of(self.base, stop, pad_token_id)
        return decode(self.next_logits(use_cache), ids, mask, stop, pad, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, use_cache=use_cache,
                      max_positions=self.base.config.max_position_embeddings, **options)
