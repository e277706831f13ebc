"""Hugging Face PEFT as the oracle: adapter files cross in both directions with the same
logits, and PEFT's numbers (trainable-parameter line, merges, combinations, mixed batches)
are reproduced. Runs where torch, transformers and peft are installed (CI installs them).
"""
from __future__ import annotations


import pytest

torch = pytest.importorskip("torch", reason="torch not installed (the PEFT oracle tests need it)")
transformers = pytest.importorskip("transformers", reason="transformers not installed")
peft = pytest.importorskip("peft", reason="peft not installed (Hugging Face PEFT is the oracle)")

from minipeft.peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from tests.peft.helpers import (  # noqa: E402
    assert_logits_close, assert_peft_loads_ours, assert_peft_saved_loads_here, hf_checkpoints, hf_model, our_logits,
    ours, peft_randomize, printed, randomize, their_logits, token_ids,
)

MODELS = {"untied": {}, "bias": {"attention_bias": True}, "tied": {"tie_word_embeddings": True}}
CASES = {
    "lora": ("untied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": ("untied", dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear")),
    "dora": ("untied", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "dora_bias": ("bias", dict(r=2, lora_alpha=4, use_dora=True, bias="lora_only",
                               target_modules=["q_proj", "o_proj"])),
    "dora_embedding_saved_head": ("untied", dict(r=4, lora_alpha=8, use_dora=True, modules_to_save=["lm_head"],
                                                 target_modules=["embed_tokens", "q_proj"])),
    "tied_embedding": ("tied", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"])),
    "patterns_bias_all": ("bias", dict(r=4, lora_alpha=8, bias="all", target_modules=["q_proj", "v_proj"],
                                       rank_pattern={"v_proj": 2},
                                       alpha_pattern={r"layers\.1\.self_attn\.q_proj": 16})),
}
IDS = list(CASES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return hf_checkpoints(tmp_path_factory, MODELS)


@pytest.mark.parametrize("case", IDS)
def test_an_adapter_saved_here_loads_in_peft(case, folders, tmp_path):
    model_kind, config = CASES[case]
    peft_model = get_peft_model(ours(folders[model_kind]), LoraConfig(**config))
    randomize(peft_model)
    assert_peft_loads_ours(peft_model, folders[model_kind], tmp_path, rtol=1e-4)


@pytest.mark.parametrize("case", IDS)
def test_an_adapter_saved_by_peft_loads_here(case, folders, tmp_path):
    model_kind, config = CASES[case]
    theirs = peft.get_peft_model(hf_model(folders[model_kind]), peft.LoraConfig(task_type="CAUSAL_LM", **config))
    peft_randomize(theirs)
    assert_peft_saved_loads_here(theirs, folders[model_kind], tmp_path, rtol=1e-4)


@pytest.mark.parametrize("config", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(r=16, lora_alpha=32, target_modules="all-linear"),
    dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    dict(r=4, target_modules=["embed_tokens", "q_proj"]),
    dict(r=4, use_dora=True, target_modules="all-linear", bias="all"),
], ids=["q_v", "all_linear", "modules_to_save", "embedding", "dora_bias_all"])
@pytest.mark.parametrize("model_kind", ["untied", "bias"])
def test_the_trainable_parameter_line_is_peft_character_for_character(config, model_kind, folders):
    mine = printed(get_peft_model(ours(folders[model_kind]), LoraConfig(**config)).print_trainable_parameters)
    theirs = printed(peft.get_peft_model(hf_model(folders[model_kind]), peft.LoraConfig(**config))
                     .print_trainable_parameters)
    assert mine == theirs


def test_the_config_file_has_exactly_peft_keys():
    assert set(LoraConfig().to_dict()) == set(peft.LoraConfig().to_dict())


def test_merge_and_unload_gives_the_model_peft_merges(folders, tmp_path):
    config = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "embed_tokens", "gate_proj"])
    peft_model = get_peft_model(ours(folders["untied"]), LoraConfig(**config))
    randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")  # a folder transformers loads
    theirs = peft.PeftModel.from_pretrained(hf_model(folders["untied"]), str(tmp_path / "adapter")).merge_and_unload()
    assert_logits_close(their_logits(hf_model(tmp_path / "merged"), token_ids()), their_logits(theirs, token_ids()),
                        rtol=1e-4)


@pytest.fixture
def two_adapters(folders, tmp_path):
    """Adapters "a" and "b" (equal ranks, one with an embedding target) saved to disk, loaded in both libraries."""
    model = get_peft_model(ours(folders["untied"]), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=4, target_modules=["v_proj", "up_proj"]))
    randomize(model)
    model.save_pretrained(tmp_path)
    mine = PeftModel.from_pretrained(ours(folders["untied"]), tmp_path / "a", adapter_name="a")
    mine.load_adapter(tmp_path / "b", "b")
    theirs = peft.PeftModel.from_pretrained(hf_model(folders["untied"]), str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    return mine, theirs


@pytest.mark.parametrize("kind", ["cat", "linear", "svd"])
def test_add_weighted_adapter_matches_peft(kind, two_adapters):
    mine, theirs = two_adapters
    for model in (mine, theirs):
        model.add_weighted_adapter(["a", "b"], [0.8, -0.6], "mix", combination_type=kind)
        model.set_adapter("mix")
    assert_logits_close(our_logits(mine, token_ids()), their_logits(theirs.eval(), token_ids()), rtol=1e-4)


def test_mixed_batches_match_peft(two_adapters):
    mine, theirs = two_adapters
    names = ["b", "__base__", "a", "b"]
    ids = token_ids(batch=4)
    expected = their_logits(theirs.eval(), ids, adapter_names=names)
    assert_logits_close(our_logits(mine.eval(), ids, adapter_names=names), expected, rtol=1e-4)
