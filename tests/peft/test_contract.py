"""The contract every PEFT method keeps, one table over the registry: the tests are the spec.

Each row of CASES is a method (or a variant of one) with its expected trainable-parameter
count: ``count(base_model)``, the formula in the method's docstring (for the low-rank rows,
computed from the modules they adapt and their ranks); whether it can merge (rows that
cannot must refuse, changing nothing); and whether it starts as the identity (rows that do
not must change the outputs). Every property below is a separate test over every row; every
row also trains two steps through the Trainer (the method's hooks included), saves, and
loads into a fresh model with the same logits. A method added to the registry must add its
rows here (``test_every_registered_method_has_a_row``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.backend import to_numpy
from minipeft.errors import ConfigError
from minipeft.nn import Embedding, Linear
from minipeft.peft import REGISTRY, LoraConfig, PeftModel, get_peft_model
from minipeft.peft.additive.adapter_fusion import AdapterFusionConfig
from minipeft.peft.additive.bottleneck import DoubleSeqBnConfig, SeqBnConfig
from minipeft.peft.additive.ia3 import IA3Config
from minipeft.peft.additive.prefix_tuning import PrefixTuningConfig
from minipeft.peft.additive.prompt_tuning import PromptTuningConfig
from minipeft.peft.lowrank.adalora import AdaLoraConfig
from minipeft.peft.lowrank.dylora import DyLoraConfig
from minipeft.peft.lowrank.relora import ReLoraConfig
from minipeft.peft.lowrank.lokr import LoKrConfig
from minipeft.peft.selective.bitfit import BeftConfig
from minipeft.peft.selective.child_tuning import ChildTuningConfig
from minipeft.peft.selective.fishmask import FishMaskConfig
from minipeft.peft.selective.full import FullFineTuningConfig
from tests.peft.helpers import (
    TINIER,
    assert_grads_match_fd,
    frozen_dora_norms,
    logits,
    randomize,
    tiny_model,
    token_ids,
    weighted_logits,
)
from tests.peft.additive.test_bottleneck import bottleneck_count
from tests.peft.additive.test_ia3 import ia3_count
from tests.peft.lowrank.test_lokr import lokr_count
from tests.peft.selective.test_bitfit import bitfit_count
from tests.peft.selective.test_child_tuning import child_tuning_count
from tests.peft.selective.test_fishmask import fishmask_count


@dataclass(frozen=True)
class Case:
    id: str
    config: object
    ranks: dict  # last name component of each adapted module -> its rank r
    model: dict = field(default_factory=dict)  # LlamaConfig overrides (e.g. biases)
    identity: bool = True  # does the method promise the base model's output at init?
    per_rank: int = 0  # parameters per rank beyond in + out (AdaLoRA's singular value E_i: 1)
    count: Callable | None = None  # (base model) -> trainable parameters; None: the low-rank formula below
    mergeable: bool = True  # can merge_adapter fold it into the weights? (else it must refuse)
    noop_merge: bool = False  # the trained weights are the model's own (full fine-tuning): merging changes none


CASES = [
    Case("lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), {"q_proj": 4, "v_proj": 4}),
    Case("rslora", LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "down_proj"]),
         {"k_proj": 4, "down_proj": 4}),
    Case("dora", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"]),
         {"q_proj": 4, "up_proj": 4}),
    Case("lora_embedding", LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]),
         {"embed_tokens": 4, "o_proj": 4}),
    Case("dora_embedding", LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["embed_tokens", "v_proj"]),
         {"embed_tokens": 2, "v_proj": 2}),
    Case("rank_pattern", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                    rank_pattern={"gate_proj": 2}, alpha_pattern={"q_proj": 3}),
         {"q_proj": 4, "gate_proj": 2}),
    Case("dropout", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["v_proj", "down_proj"]),
         {"v_proj": 4, "down_proj": 4}),
    Case("bias_lora_only", LoraConfig(r=2, lora_alpha=4, bias="lora_only", target_modules=["q_proj", "o_proj"]),
         {"q_proj": 2, "o_proj": 2}, model={"attention_bias": True}),
    Case("bias_all", LoraConfig(r=2, lora_alpha=4, bias="all", use_dora=True, target_modules=["v_proj"]),
         {"v_proj": 2}, model={"attention_bias": True}),
    Case("modules_to_save", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
         {"q_proj": 2}),
    Case("adalora", AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                  target_modules=["q_proj", "v_proj", "down_proj"]),
         {"q_proj": 4, "v_proj": 4, "down_proj": 4}, per_rank=1),
    Case("adalora_dropout_bias", AdaLoraConfig(init_r=3, target_r=1, total_step=5, lora_alpha=6, lora_dropout=0.25,
                                               bias="lora_only", target_modules=["k_proj", "o_proj"]),
         {"k_proj": 3, "o_proj": 3}, model={"attention_bias": True}, per_rank=1),
    # DyLoRA: training runs at the rank apply() drew from [r_min, r]; eval / merge / save at eval_rank
    Case("dylora", DyLoraConfig(r=4, lora_alpha=8, r_min=2, eval_rank=3, target_modules=["q_proj", "v_proj"]),
         {"q_proj": 4, "v_proj": 4}),
    Case("dylora_frozen_embedding", DyLoraConfig(r=3, lora_alpha=6, frozen=True, eval_rank=2,
                                                 target_modules=["embed_tokens", "o_proj"]),
         {"embed_tokens": 3, "o_proj": 3}),
    # ReLoRA rewrites W only at a restart (its on_step_end, after update reset_every + 1, which these tests never
    # call): with reset_every=1000 > every step count here, "base weights untouched" is its between-restarts promise
    Case("relora", ReLoraConfig(r=4, lora_alpha=8, reset_every=1000, target_modules=["q_proj", "down_proj"]),
         {"q_proj": 4, "down_proj": 4}),
    # ----- additive methods (each block owned by its method's file) -----
    # ia3 rows
    # out per output-scaled target + in per feed-forward (input-scaled) target
    Case("ia3", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), {},
         count=lambda base: ia3_count(base, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"]))),
    Case("ia3_bias_random_init", IA3Config(target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                                           feedforward_modules=["o_proj", "up_proj"], init_ia3_weights=False), {},
         model={"attention_bias": True}, identity=False,
         count=lambda base: ia3_count(base, IA3Config(target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                                                      feedforward_modules=["o_proj", "up_proj"]))),
    # prompt tuning rows
    # P·d (d = hidden_size); SAMPLE_VOCAB starts from rows of the embedding matrix
    Case("prompt", PromptTuningConfig(num_virtual_tokens=3), {}, identity=False, mergeable=False,
         count=lambda base: 3 * base.config.hidden_size),
    Case("prompt_sample_vocab", PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"), {},
         identity=False, mergeable=False, count=lambda base: 5 * base.config.hidden_size),
    # prefix tuning rows
    # P·2·L·D with D = head_dim·Hkv (GQA, as PEFT); with the projection P·D + D·h + h + h·2LD + 2LD
    Case("prefix", PrefixTuningConfig(num_virtual_tokens=3), {}, identity=False, mergeable=False,
         count=lambda base: 3 * 2 * base.config.num_hidden_layers * base.config.head_dim
         * base.config.num_key_value_heads),
    Case("prefix_projection", PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=5),
         {}, identity=False, mergeable=False,
         count=lambda base: (lambda P, D, h, W: P * D + D * h + h + h * W + W)(
             3, base.config.head_dim * base.config.num_key_value_heads, 5,
             2 * base.config.num_hidden_layers * base.config.head_dim * base.config.num_key_value_heads)),
    # bottleneck rows
    # per adapter site 2·m·d + m + d, m = d // reduction_factor; houlsby: two sites per layer, pfeiffer one
    Case("houlsby", DoubleSeqBnConfig(reduction_factor=8), {}, identity=False, mergeable=False,
         count=lambda base: bottleneck_count(base, DoubleSeqBnConfig(reduction_factor=8))),
    Case("pfeiffer", SeqBnConfig(), {}, identity=False, mergeable=False,
         count=lambda base: bottleneck_count(base, SeqBnConfig())),
    Case("pfeiffer_mam_adapter", SeqBnConfig(init_weights="mam_adapter", non_linearity="gelu_new", scaling=0.5), {},
         mergeable=False, count=lambda base: bottleneck_count(base, SeqBnConfig())),
    Case("houlsby_dropout_leave_out", DoubleSeqBnConfig(reduction_factor={"0": 4, "default": 16}, dropout=0.25,
                                                        init_weights="houlsby", leave_out=[1]), {},
         identity=False, mergeable=False,
         count=lambda base: bottleneck_count(base, DoubleSeqBnConfig(reduction_factor={"0": 4, "default": 16},
                                                                     leave_out=[1]))),
    # adapter fusion rows
    # only the fusion trains: per fused join Q (d·d + d), K (d·d + d), V (d·d); the fused adapters stay frozen
    Case("fusion", AdapterFusionConfig(adapters=(SeqBnConfig(), SeqBnConfig(non_linearity="swish", reduction_factor=8)),
                                       adapter_names=("a", "b")), {}, identity=False, mergeable=False,
         count=lambda base: base.config.num_hidden_layers * (3 * base.config.hidden_size ** 2
                                                             + 2 * base.config.hidden_size)),
    # ----- selective methods, LoKr, full fine-tuning -----
    # bitfit rows
    # out per targeted Linear + the existing biases ``bias`` trains (its own "bias" group). On the bias-free model
    # merging creates the biases b₀ = b the Linears lack and changes no existing parameter, hence noop_merge
    Case("bitfit", BeftConfig(target_modules=["q_proj", "v_proj", "down_proj"], bias="none"), {}, noop_merge=True,
         count=lambda base: bitfit_count(base, BeftConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                                          bias="none"))),
    Case("bitfit_attention_bias", BeftConfig(target_modules=["v_proj", "o_proj", "up_proj"]), {},
         model={"attention_bias": True},
         count=lambda base: bitfit_count(base, BeftConfig(target_modules=["v_proj", "o_proj", "up_proj"]))),
    Case("bitfit_all_biases_random_init", BeftConfig(target_modules=["k_proj", "gate_proj"], bias="all",
                                                     init_weights=False), {},
         model={"attention_bias": True, "mlp_bias": True}, identity=False,
         count=lambda base: bitfit_count(base, BeftConfig(target_modules=["k_proj", "gate_proj"], bias="all"))),
    # child-tuning rows
    # F: out·in per target (dense ΔW); D: k = n − ⌈(1 − p)(n − 1)⌉ mask entries (sparse ΔW). D's mask is a placeholder
    # of that size until calibrate (the Trainer's two steps calibrate first); randomize() gives its values noise
    Case("child_f", ChildTuningConfig(mode="F", target_modules=["q_proj", "down_proj"]), {},
         count=lambda base: child_tuning_count(base, ChildTuningConfig(mode="F", target_modules=["q_proj", "down_proj"]))),
    Case("child_d", ChildTuningConfig(mode="D", reserve_p=0.3, target_modules=["v_proj", "up_proj"]), {},
         count=lambda base: child_tuning_count(base, ChildTuningConfig(target_modules=["v_proj", "up_proj"]))),
    # fishmask rows
    # k = int(n · keep_ratio), n = Σ out·in over the targets (placeholder mask until calibrate, as child_d)
    Case("fishmask", FishMaskConfig(keep_ratio=0.02, num_samples=3, target_modules=["q_proj", "k_proj", "gate_proj"]),
         {}, count=lambda base: fishmask_count(base, FishMaskConfig(keep_ratio=0.02,
                                                                    target_modules=["q_proj", "k_proj", "gate_proj"]))),
    # lokr rows
    # per Linear, (a, b) = fact(out), (c, d) = fact(in): (a·c or r·(a + c)) + (b·d or r·(b + d)), the second of each
    # when that Kronecker factor is low-rank (W1: decompose_both and r < max(a, c)/2; W2: r < max(b, d)/2)
    Case("lokr", LoKrConfig(), {}, count=lambda base: lokr_count(base, LoKrConfig())),
    Case("lokr_low_rank_w1_w2", LoKrConfig(r=1, alpha=3, decompose_both=True, target_modules=["q_proj", "down_proj"]),
         {}, count=lambda base: lokr_count(base, LoKrConfig(r=1, decompose_both=True,
                                                            target_modules=["q_proj", "down_proj"]))),
    Case("lokr_factor_lycoris_rank_dropout", LoKrConfig(r=2, decompose_factor=2, init_weights="lycoris",
                                                        rank_dropout=0.25, rank_dropout_scale=True,
                                                        rank_pattern={"up_proj": 4},
                                                        target_modules=["k_proj", "o_proj", "up_proj"]), {},
         count=lambda base: lokr_count(base, LoKrConfig(r=2, decompose_factor=2, rank_pattern={"up_proj": 4},
                                                        target_modules=["k_proj", "o_proj", "up_proj"]))),
    # full fine-tuning rows
    # every parameter of the model (a tied embedding / head once); the identity at init; a no-op merge
    Case("full", FullFineTuningConfig(), {}, noop_merge=True,
         count=lambda base: sum(p.size for p in base.parameters())),
    Case("full_tied_biases", FullFineTuningConfig(), {}, model={"tie_word_embeddings": True, "attention_bias": True},
         noop_merge=True, count=lambda base: sum(p.size for p in base.parameters())),
]
IDS = [c.id for c in CASES]


def make(case: Case, seed: int = 0, dtype=np.float32, size=None):
    base = tiny_model(seed, dtype=dtype, **({"size": size} if size else {}), **case.model)
    return get_peft_model(base, case.config, seed=seed)


def formula_count(base, case: Case) -> int:
    """The row's own count, or the low-rank docstrings' count: r·(in + out) per Linear (+ out with DoRA), r·(num + dim) per
    Embedding (+ dim with DoRA), + the trained biases, + full modules_to_save copies."""
    if case.count is not None:
        return case.count(base)
    config, total = case.config, 0
    for name, module in base.named_modules():
        r = case.ranks.get(name.rsplit(".", 1)[-1])
        if r is None:
            continue
        if isinstance(module, Linear):
            total += (r * (module.in_features + module.out_features + case.per_rank)
                      + config.use_dora * module.out_features)
            if config.bias == "lora_only" and module.bias is not None:
                total += module.bias.size
        elif isinstance(module, Embedding):
            total += r * (module.num_embeddings + module.embedding_dim) + config.use_dora * module.embedding_dim
    if config.bias == "all":
        total += sum(p.size for n, p in base.named_parameters() if n.endswith(".bias"))
    for saved in config.modules_to_save or ():
        total += sum(p.size for p in base.get_submodule(saved).parameters())
    return total


def group_params(peft_model):
    return [p for g in peft_model.parameter_groups() for p in g.params]


def test_every_registered_method_has_a_row():
    assert {c.config.peft_type for c in CASES} == set(REGISTRY)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_identity_at_init(case, seed):
    base = tiny_model(seed, **case.model)
    ids = token_ids(seed)
    before = logits(base, ids)
    peft_model = get_peft_model(base, case.config, seed=seed).eval()
    after = logits(peft_model, ids)
    if case.identity:
        np.testing.assert_array_equal(after, before)
    else:  # a method that does not start as the identity must change the outputs at init
        assert not np.array_equal(after, before)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_apply_returns_exactly_the_parameters_it_added_as_its_group(case):
    model = tiny_model(**case.model).requires_grad_(False)  # frozen, as PeftModel holds it: what apply unfreezes shows
    method = REGISTRY[case.config.peft_type]
    group = method.apply(model, case.config, np.random.default_rng(0), adapter_name="x")
    assert group.name == f"{method.group_prefix}:x"
    # what apply added or unfroze (full fine-tuning: the model's own weights); frozen bookkeeping a method adds
    # (AdaLoRA's ranknum, as in PEFT) is not trained, so not in the group
    added = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for p in group.params) == sorted(added) and len(added) == len(set(added))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trainable_count_is_the_docstring_formula(case):
    expected = formula_count(tiny_model(0, **case.model), case)
    peft_model = make(case)
    assert peft_model.get_nb_trainable_parameters()[0] == expected
    assert sum(g.num_parameters() for g in peft_model.parameter_groups()) == expected
    names = {g.name.split(":")[0] for g in peft_model.parameter_groups()}
    bias = getattr(case.config, "bias", "none")
    assert REGISTRY[case.config.peft_type].group_prefix in names and ("bias" in names) == (bias != "none")
    assert ("modules_to_save" in names) == bool(getattr(case.config, "modules_to_save", None))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_the_groups_receive_gradients(case):
    peft_model = make(case)
    randomize(peft_model)
    peft_model(token_ids(), labels=token_ids()).loss.backward()
    with_grad = {id(p) for p in peft_model.parameters() if p.grad is not None}
    assert with_grad == {id(p) for p in group_params(peft_model)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_leaves_base_weights_bitwise_untouched(case):
    peft_model = make(case)
    snapshot = {n: p.data.copy() for n, p in peft_model.named_parameters()}
    trained = {id(p) for p in group_params(peft_model)}
    for _ in range(3):
        peft_model.zero_grad()
        peft_model(token_ids(), labels=token_ids()).loss.backward()
        for p in group_params(peft_model):
            p.data = p.data - 0.1 * p.grad
    for name, p in peft_model.named_parameters():
        if id(p) in trained:
            assert not np.array_equal(p.data, snapshot[name]), f"{name} did not train"
        else:
            np.testing.assert_array_equal(p.data, snapshot[name], err_msg=f"{name} changed")


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_merged_forward_equals_unmerged(case, seed):
    peft_model = make(case, seed).eval()
    randomize(peft_model, seed)
    ids = token_ids(seed)
    unmerged = logits(peft_model, ids)
    if not case.mergeable:
        return assert_merge_refused(peft_model)
    peft_model.merge_adapter()
    merged = logits(peft_model, ids)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5 * np.abs(unmerged).max())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unmerge_restores_the_weights(case):
    peft_model = make(case).eval()
    randomize(peft_model)
    if not case.mergeable:
        return assert_merge_refused(peft_model)
    before = {n: p.data.copy() for n, p in peft_model.named_parameters()}
    unmerged = logits(peft_model, token_ids())
    peft_model.merge_adapter()
    # a merge changes W; a no-op merge (full fine-tuning) changes nothing
    assert any(not np.array_equal(p.data, before[n]) for n, p in peft_model.named_parameters()) != case.noop_merge
    peft_model.unmerge_adapter()
    for name, p in peft_model.named_parameters():
        np.testing.assert_allclose(p.data, before[name], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(logits(peft_model, token_ids()), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_is_idempotent(case):
    peft_model = make(case).eval()
    randomize(peft_model)
    if not case.mergeable:
        return assert_merge_refused(peft_model)
    peft_model.merge_adapter()
    once = {n: p.data.copy() for n, p in peft_model.named_parameters()}
    peft_model.merge_adapter()
    for name, p in peft_model.named_parameters():
        np.testing.assert_array_equal(p.data, once[name], err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_then_load_into_a_fresh_model_gives_the_same_outputs(case, tmp_path):
    peft_model = make(case).eval()
    randomize(peft_model)
    expected = logits(peft_model, token_ids())
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(0, **case.model), tmp_path)
    np.testing.assert_array_equal(logits(loaded, token_ids()), expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference: frozen, as PEFT
    trainable = PeftModel.from_pretrained(tiny_model(0, **case.model), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_equal_finite_differences(case):
    """float64, on an even smaller model; DoRA's norm held constant, as the method defines it."""
    peft_model = make(case, dtype=np.float64, size=TINIER)
    randomize(peft_model)
    ids = token_ids(batch=2, length=4, vocab=TINIER["vocab_size"])
    with frozen_dora_norms():
        assert_grads_match_fd(lambda: weighted_logits(peft_model, ids), group_params(peft_model),
                              rng=peft_model.rng)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_core_promises_hold_on_every_backend(case, backend):
    """Gradients only in the groups, base weights untouched by a step, merged == unmerged —
    with the model on the backend under test (CuPy where a GPU is present)."""
    peft_model = make(case)
    randomize(peft_model)
    peft_model.to(backend.device)
    ids, labels = token_ids(), token_ids(2)
    snapshot = {n: to_numpy(p.data).copy() for n, p in peft_model.named_parameters()}
    peft_model.train()
    peft_model(ids, labels=labels).loss.backward()
    trained = {id(p) for p in group_params(peft_model)}
    assert {id(p) for p in peft_model.parameters() if p.grad is not None} == trained
    for p in group_params(peft_model):
        p.data = p.data - 0.1 * p.grad
    for name, p in peft_model.named_parameters():
        if id(p) not in trained:
            np.testing.assert_array_equal(to_numpy(p.data), snapshot[name], err_msg=f"{name} changed")
    peft_model.zero_grad()
    peft_model.eval()
    unmerged = logits(peft_model, ids)
    if not case.mergeable:
        return assert_merge_refused(peft_model)
    peft_model.merge_adapter()
    merged = logits(peft_model, ids)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5 * np.abs(unmerged).max())


def assert_merge_refused(peft_model):
    """A method that cannot merge refuses merge_adapter and merge_and_unload in one sentence,
    before any weight or layer changes."""
    before = {n: to_numpy(p.data).copy() for n, p in peft_model.named_parameters()}
    ids = token_ids()
    expected = logits(peft_model, ids)
    for merge in (peft_model.merge_adapter, peft_model.merge_and_unload):
        with pytest.raises(ConfigError, match="cannot be merged"):
            merge()
    for name, p in peft_model.named_parameters():
        np.testing.assert_array_equal(to_numpy(p.data), before[name], err_msg=name)
    np.testing.assert_array_equal(logits(peft_model, ids), expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_two_trainer_steps_save_and_reload(case, tmp_path):
    """Two updates through the Trainer (so through the method's own hooks), then save_pretrained
    and PeftModel.from_pretrained into a fresh base model: the same logits."""
    from minipeft.train import Trainer, TrainingArguments  # noqa: PLC0415
    from minipeft.train.data import Dataset, Example  # noqa: PLC0415

    peft_model = make(case)
    ids = token_ids(5, batch=4, length=8)
    examples = [Example(row, row.copy(), f"row {i}") for i, row in enumerate(ids)]
    data = Dataset(examples, pad_id=0, seq_len=8)
    trained = {id(p): to_numpy(p.data).copy() for p in group_params(peft_model)}
    args = TrainingArguments(str(tmp_path / "run"), max_steps=2, batch_size=2, lr=1e-2, seq_len=8,
                             warmup_steps=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. AdaLoRA's notes on a 2-step schedule: not what this test checks
        Trainer(peft_model, args, data).train()
    assert any(not np.array_equal(to_numpy(p.data), trained[id(p)]) for p in group_params(peft_model))
    peft_model.eval()
    expected = logits(peft_model, token_ids())
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model(0, **case.model), tmp_path / "adapter")
    # equal up to rounding: AdaLoRA saves its factors cropped to the kept ranks (a shorter sum)
    np.testing.assert_allclose(logits(loaded, token_ids()), expected, rtol=1e-6, atol=1e-6)

