"""Layer patterns, override precedence, plan validation and recipe files."""

from dataclasses import replace

import pytest

from lowbit.errors import LowbitError
from lowbit.recipe import Override, Recipe, format_plan, has_static_inputs, matches, resolve_plan, validate_plan
from lowbit.spec import parse_scheme, parse_kv_cache_dtype

LINEARS = {
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.mlp.down_proj": (64, 96),
    "model.layers.1.self_attn.q_proj": (64, 64),
    "model.layers.1.mlp.down_proj": (64, 96),
    "lm_head": (300, 64),
}


def recipe(scheme="w_uint4_per_group_asym", group_size=32, **kw):
    return Recipe(scheme=parse_scheme(scheme, group_size), **kw)


def test_pattern_rules():
    assert matches("down_proj", "model.layers.3.mlp.down_proj")
    assert matches("mlp.down_proj", "model.layers.3.mlp.down_proj")
    assert matches("layers.0", "model.layers.0.mlp.down_proj")
    assert not matches("layers.1", "model.layers.10.mlp.down_proj")
    assert not matches("proj", "model.layers.3.mlp.down_proj")
    assert matches("*.mlp.*", "model.layers.3.mlp.down_proj")
    assert matches("re:.*layers\\.[0-4]\\.mlp", "model.layers.3.mlp.down_proj")
    assert matches("lm_head", "lm_head")


def test_lm_head_excluded_by_default_and_explicit_empty_list_quantizes_it():
    plan = resolve_plan(recipe(), LINEARS)
    assert plan["lm_head"].spec is None and plan["lm_head"].reason == "excluded"
    plan = resolve_plan(recipe(exclude=()), LINEARS)
    assert plan["lm_head"].spec is not None


def test_override_precedence():
    r = recipe(exclude=(), overrides=(
        Override.parse("down_proj:bits=8"),
        Override.parse("model.layers.1.mlp.down_proj:bits=6"),  # exact name beats every pattern
        Override.parse("layers.1:bits=5"),                      # later pattern beats earlier one
        Override.parse("lm_head:group_size=16"),
    ))
    plan = resolve_plan(r, LINEARS)
    assert plan["model.layers.0.mlp.down_proj"].spec.bits == 8
    assert plan["model.layers.1.mlp.down_proj"].spec.bits == 6
    assert plan["model.layers.1.self_attn.q_proj"].spec.bits == 5
    assert plan["model.layers.0.self_attn.q_proj"].spec.bits == 4
    assert plan["lm_head"].spec.group_size == 16 and plan["lm_head"].spec.bits == 4


def test_exclusion_beats_overrides():
    r = recipe(exclude=("down_proj",), overrides=(Override.parse("down_proj:bits=8"),))
    plan = resolve_plan(r, LINEARS)
    assert plan["model.layers.0.mlp.down_proj"].spec is None


def test_override_with_scheme_name():
    r = recipe(overrides=(Override.parse("q_proj:scheme=w_int8_per_channel_sym"),))
    spec = resolve_plan(r, LINEARS)["model.layers.0.self_attn.q_proj"].spec
    assert (spec.bits, spec.signed, spec.granularity) == (8, True, "channel")


@pytest.mark.parametrize("text", ["down_proj", "down_proj:bits", ":bits=8", "x:colour=red", "x:bits=four"])
def test_bad_overrides_are_refused(text):
    with pytest.raises(LowbitError):
        Override.parse(text)


def test_pattern_matching_nothing_is_refused():
    with pytest.raises(LowbitError, match="matches no linear"):
        resolve_plan(recipe(exclude=("lm_haed",)), LINEARS)


def test_validation_group_larger_than_layer():
    r = recipe(group_size=128)
    with pytest.raises(LowbitError, match="group size 128 is larger"):
        validate_plan(resolve_plan(r, LINEARS), r.scheme)


def test_float_formats_plan_and_kv_cache():
    r = recipe("w_mxfp4_a_mxfp4", None)
    plan = resolve_plan(r, LINEARS)
    validate_plan(plan, r.scheme)
    assert plan["model.layers.0.mlp.down_proj"].input_spec.dynamic
    kv = {**LINEARS, "model.layers.0.self_attn.k_proj": (32, 64), "model.layers.0.self_attn.v_proj": (32, 64)}
    r = recipe("w_fp8_a_fp8", None, kv_cache=parse_kv_cache_dtype("fp8"))
    plan = resolve_plan(r, kv)
    assert [n for n, lp in plan.items() if lp.output_spec is not None] == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert has_static_inputs(plan) and Recipe.from_dict(r.to_dict()).kv_cache == r.kv_cache
    with pytest.raises(LowbitError, match="separate k_proj and v_proj"):
        resolve_plan(r, LINEARS)
    with pytest.raises(LowbitError, match="unknown KV-cache dtype"):
        parse_kv_cache_dtype("int3")


def test_validation_of_activation_specs():
    r = recipe("w_int8_a_int8_per_tensor_sym", None)  # integer activations are implemented
    plan = resolve_plan(r, LINEARS)
    validate_plan(plan, r.scheme)
    assert all(lp.input_spec == r.scheme.input for lp in plan.values() if lp.spec is not None)
    with pytest.raises(LowbitError, match="per-token granularity is for activations"):
        validate_plan({n: replace(lp, spec=lp.spec and lp.spec.with_changes(granularity="token"))
                       for n, lp in plan.items()}, r.scheme)


def test_plan_table_folds_blocks():
    text = format_plan(resolve_plan(recipe(), LINEARS))
    assert "model.layers.*.mlp.down_proj" in text and "4 of 5 linear modules quantized" in text


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_round_trip(tmp_path, suffix):
    r = recipe(exclude=(), overrides=(Override.parse("down_proj:bits=8,symmetric=true"),))
    r.save(tmp_path / f"r{suffix}")
    back = Recipe.load(tmp_path / f"r{suffix}")
    assert back.to_dict() == r.to_dict()
    assert resolve_plan(back, LINEARS) == resolve_plan(r, LINEARS)
