"""targeting.py: PEFT's rules for which modules a config adapts (REFERENCE 1.4)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.errors import ConfigError
from minipeft.peft import LoraConfig, get_peft_model
from minipeft.peft.core import targeting
from tests.peft.helpers import import_oracles, tiny_model

Q0 = "model.layers.0.self_attn.q_proj"


def adapted(**config) -> list[str]:
    peft_model = get_peft_model(tiny_model(), LoraConfig(**config))
    return [path for path, _ in peft_model.named_adapter_modules()]


def test_list_entries_match_exactly_or_as_a_dotted_suffix():
    assert targeting.matches(("q_proj",), Q0)
    assert targeting.matches(("self_attn.q_proj",), Q0)
    assert targeting.matches((Q0,), Q0)
    assert not targeting.matches(("proj",), Q0)  # not a bare substring
    assert not targeting.matches(("_proj",), Q0)


def test_a_string_is_a_regex_matched_against_the_whole_name():
    assert targeting.matches(r".*\.q_proj", Q0)
    assert not targeting.matches(r"q_proj", Q0)  # fullmatch, not search
    assert adapted(target_modules=r".*layers\.1\..*(q|k)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_all_linear_is_every_linear_but_the_output_head():
    names = adapted(target_modules="all-linear")
    assert len(names) == 2 * 7 and "lm_head" not in names
    peft_model = get_peft_model(tiny_model(), LoraConfig(target_modules="ALL-LINEAR"))
    assert peft_model.peft_config["default"].target_modules == tuple(sorted(names))  # stored explicitly, as PEFT


def test_layers_to_transform_and_layers_pattern():
    assert adapted(target_modules=["q_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.q_proj"]
    assert adapted(target_modules=["q_proj", "v_proj"], layers_to_transform=[0], layers_pattern="layers") == [
        Q0, "model.layers.0.self_attn.v_proj"]
    assert targeting.layer_index("model.layers.3.mlp.up_proj") == 3
    assert targeting.layer_index("model.layers.3.mlp.up_proj", ["h", "layers"]) == 3
    assert targeting.layer_index("lm_head") is None
    # a name equal to an entry bypasses the layer filter (PEFT's order of checks)
    assert adapted(target_modules=[Q0, "v_proj"], layers_to_transform=[1]) == [
        Q0, "model.layers.1.self_attn.v_proj"]


def test_exclude_modules_and_modules_to_save_are_never_adapted():
    assert adapted(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj"]) == [
        Q0, "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert adapted(target_modules="all-linear", exclude_modules=r".*mlp.*") == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"]
    peft_model = get_peft_model(tiny_model(), LoraConfig(target_modules=r".*(q_proj|lm_head)",
                                                         modules_to_save=["lm_head"]))
    assert type(peft_model.base_model.model.lm_head).__name__ == "ModulesToSaveWrapper"


def test_patterns_take_the_first_key_matching_at_a_dot_boundary():
    patterns = {r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 3, "proj": 5}
    assert targeting.pattern_value(patterns, Q0, 8) == 2
    assert targeting.pattern_value(patterns, "model.layers.1.self_attn.q_proj", 8) == 3
    assert targeting.pattern_value(patterns, "model.layers.1.self_attn.k_proj", 8) == 8  # "proj" ≠ "k_proj"
    assert targeting.pattern_value({"k_proj": 1, "proj": 4}, "model.layers.1.mlp.proj", 8) == 4


def test_nothing_matched_lists_names_the_model_has():
    with pytest.raises(ConfigError, match=r"matched no module.*q_proj.*down_proj"):
        get_peft_model(tiny_model(), LoraConfig(target_modules=["query"]))
    with pytest.raises(ConfigError, match=r"layers_to_transform=\[7\]"):
        get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(ConfigError, match="excluded"):
        get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_a_module_of_an_unsupported_kind_is_refused_before_anything_changes():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"'model.norm' is a RMSNorm.*Linear, Embedding"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "norm"]))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # nothing was wrapped


def test_config_rules_for_layer_selection():
    with pytest.raises(ConfigError, match="layers_pattern"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ConfigError, match="layers_to_transform"):
        LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])


NAMES = [Q0, "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens", "lm_head",
         "model.layers.10.mlp.up_proj", "model.layers.0", "model.norm"]


@settings(max_examples=60, deadline=None)
@given(targets=st.one_of(st.lists(st.sampled_from(["q_proj", "v_proj", "mlp.down_proj", "proj", "lm_head", Q0,
                                                    "layers.0", "embed_tokens"]), min_size=1, max_size=3),
                         st.sampled_from([r".*\.q_proj", r".*layers\.1.*", "lm_head", r".*(up|down)_proj"])),
       layers=st.one_of(st.none(), st.integers(0, 1), st.lists(st.integers(0, 10), max_size=2)),
       exclude=st.one_of(st.none(), st.lists(st.sampled_from(["v_proj", "layers.0.self_attn.q_proj"]), max_size=1)),
       name=st.sampled_from(NAMES))
def test_matching_agrees_with_peft(targets, layers, exclude, name):
    import_oracles()
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if isinstance(targets, str):
        layers = None
    theirs = check_target_module_exists(
        PeftLoraConfig(target_modules=targets, layers_to_transform=layers, exclude_modules=exclude), name)
    ours = targeting.is_target(LoraConfig(target_modules=targets, layers_to_transform=layers,
                                          exclude_modules=exclude), name)
    expected = None if type(theirs).__name__ == "_ExcludedModule" else bool(theirs)
    assert ours == expected
