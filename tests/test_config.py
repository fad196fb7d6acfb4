"""Recipes: round trips through dicts, JSON and YAML; unknown keys, wrong types and bad values refused."""

from __future__ import annotations

import json

import pytest
import yaml

from frugal.config import RECIPE_VERSION, ClipSearch, GPTQOptions, Recipe, WeightScheme
from frugal.errors import FrugalError

CUSTOM = {
    "method": "rtn",
    "weights": {"bits": 3, "group_size": 64, "symmetric": False},
    "clip": {"enabled": True, "grid": 20, "max_shrink": 0.5},
    "gptq": {"dampening": 0.05, "act_order": False, "block_size": 64, "max_damp_retries": 2},
    "calibration": {"num_samples": 16, "seq_len": 256},
    "ignore": ["lm_head", "model.layers.0.*"],
    "seed": 7,
}


def custom() -> Recipe:
    """A recipe in which every field differs from its default."""
    return Recipe.from_dict(CUSTOM)


def raises_naming(data: dict, *names: str) -> str:
    """Assert Recipe.from_dict(data) raises FrugalError whose message names every string in `names`."""
    with pytest.raises(FrugalError) as info:
        Recipe.from_dict(data)
    msg = str(info.value)
    for n in names:
        assert n in msg, msg
    return msg


def test_defaults():
    """The default recipe is version 3, 4-bit g128 symmetric GPTQ on the signed-extreme grid with lm_head
    kept unquantized, what stays unquantized in bfloat16 and the scales in float16."""
    r = Recipe()
    assert (r.version, r.method, r.seed) == (RECIPE_VERSION, "gptq", 0) and RECIPE_VERSION == 3
    assert r.weights == WeightScheme(4, 128, True, "model", signed_scale=True)
    assert (r.storage.dtype, r.storage.scale_dtype) == ("bfloat16", "float16")
    assert r.calibration.batch_size == 8
    assert r.clip == ClipSearch(False, 40, 0.75)
    assert r.gptq == GPTQOptions(0.01, True, 128, 5)
    assert r.ignore == ("lm_head",)
    assert Recipe.from_dict({}) == r


def test_from_dict_sets_every_field():
    """Every value of a full dict lands in the recipe, lists become tuples."""
    r = custom()
    assert r.method == "rtn" and r.seed == 7
    assert r.weights == WeightScheme(3, 64, False)
    assert r.clip == ClipSearch(True, 20, 0.5)
    assert r.gptq == GPTQOptions(0.05, False, 64, 2)
    assert (r.calibration.num_samples, r.calibration.seq_len) == (16, 256)
    assert r.ignore == ("lm_head", "model.layers.0.*")


@pytest.mark.parametrize("recipe", [Recipe(), custom()], ids=["default", "custom"])
def test_dict_round_trip(recipe):
    """to_dict -> from_dict gives an equal recipe, and to_dict is plain JSON data."""
    d = recipe.to_dict()
    assert Recipe.from_dict(d) == recipe
    assert json.loads(json.dumps(d)) == d
    assert d["version"] == RECIPE_VERSION and isinstance(d["ignore"], list)


@pytest.mark.parametrize("recipe", [Recipe(), custom()], ids=["default", "custom"])
def test_file_round_trips(recipe, tmp_path):
    """Recipe.load of the JSON, .yaml and .yml serialisations gives equal recipes."""
    (tmp_path / "r.json").write_text(recipe.to_json())
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    (tmp_path / "r.yml").write_text(recipe.to_yaml())
    loaded = [Recipe.load(tmp_path / n) for n in ("r.json", "r.yaml", "r.yml")]
    assert loaded == [recipe] * 3
    assert yaml.safe_load(recipe.to_yaml()) == json.loads(recipe.to_json()) == recipe.to_dict()


def test_load_accepts_str_path_and_partial_yaml(tmp_path):
    """A hand-written partial YAML recipe fills the rest with defaults; ints are accepted as floats."""
    p = tmp_path / "partial.yaml"
    p.write_text("method: rtn\nweights:\n  bits: 8\ngptq:\n  dampening: 0.1\nclip:\n  max_shrink: 1\n")
    r = Recipe.load(str(p))
    assert r == Recipe(method="rtn", weights=WeightScheme(bits=8), gptq=GPTQOptions(dampening=0.1),
                       clip=ClipSearch(max_shrink=1.0))
    assert isinstance(r.clip.max_shrink, float)


@pytest.mark.parametrize("data, key", [
    ({"bitz": 4}, "recipe.bitz"),
    ({"weights": {"bitz": 4}}, "recipe.weights.bitz"),
    ({"gptq": {"act_order": True, "actorder": False}}, "recipe.gptq.actorder"),
    ({"calibration": {"samples": 4}}, "recipe.calibration.samples"),
])
def test_unknown_keys_are_refused(data, key):
    """An unknown key, at the top or nested, is a FrugalError naming its full path."""
    raises_naming(data, f"unknown key '{key}'")


@pytest.mark.parametrize("data, where", [
    ({"weights": {"bits": "4"}}, "recipe.weights.bits"),
    ({"weights": {"bits": 4.0}}, "recipe.weights.bits"),
    ({"weights": {"symmetric": 1}}, "recipe.weights.symmetric"),
    ({"weights": {"group_size": True}}, "recipe.weights.group_size"),
    ({"gptq": {"dampening": "0.01"}}, "recipe.gptq.dampening"),
    ({"gptq": {"dampening": False}}, "recipe.gptq.dampening"),
    ({"method": 1}, "recipe.method"),
    ({"seed": None}, "recipe.seed"),
    ({"ignore": "lm_head"}, "recipe.ignore"),
    ({"ignore": ["lm_head", 3]}, "recipe.ignore"),
    ({"weights": 4}, "recipe.weights"),
    ({"clip": None}, "recipe.clip"),
])
def test_wrong_types_are_refused(data, where):
    """A value of the wrong type (no silent coercion of str, bool or float to int) names the key."""
    raises_naming(data, where)


@pytest.mark.parametrize("data, names", [
    ({"weights": {"bits": 5}}, ["recipe.weights.bits=5", "(2, 3, 4, 8)"]),
    ({"weights": {"bits": 1}}, ["recipe.weights.bits=1"]),
    ({"weights": {"group_size": 100}}, ["recipe.weights.group_size=100", "(-1, 32, 64, 128)"]),
    ({"weights": {"group_size": 0}}, ["recipe.weights.group_size=0"]),
    ({"version": 4}, ["recipe.version=4"]),
    ({"storage": {"dtype": "int8"}}, ["recipe.storage.dtype='int8'", "bfloat16"]),
    ({"version": 0}, ["recipe.version=0"]),
    ({"method": "awq"}, ["recipe.method='awq'", "rtn", "gptq"]),
    ({"gptq": {"dampening": 0.0}}, ["recipe.gptq.dampening=0.0"]),
    ({"gptq": {"dampening": 1}}, ["recipe.gptq.dampening=1.0"]),
    ({"gptq": {"block_size": 0}}, ["recipe.gptq.block_size=0"]),
    ({"gptq": {"max_damp_retries": -1}}, ["recipe.gptq.max_damp_retries=-1"]),
    ({"clip": {"grid": 0}}, ["recipe.clip.grid=0"]),
    ({"clip": {"max_shrink": 1.5}}, ["recipe.clip.max_shrink=1.5"]),
    ({"calibration": {"seq_len": 1}}, ["recipe.calibration", "seq_len"]),
    ({"calibration": {"num_samples": 0}}, ["recipe.calibration", "num_samples"]),
])
def test_out_of_range_values_are_refused(data, names):
    """An unsupported value is a FrugalError naming the option (and the accepted values where listed)."""
    raises_naming(data, *names)


def test_direct_construction_validates():
    """Building a Recipe in Python validates it just like from_dict."""
    with pytest.raises(FrugalError, match=r"recipe\.weights\.bits=6"):
        Recipe(weights=WeightScheme(bits=6))
    with pytest.raises(FrugalError, match=r"recipe\.version=4"):
        Recipe(version=4)


def test_recipes_are_frozen():
    """Recipes cannot be mutated after validation."""
    r = Recipe()
    with pytest.raises(AttributeError):
        r.method = "rtn"
    with pytest.raises(AttributeError):
        r.weights.bits = 5


def test_load_errors_name_the_file(tmp_path):
    """Missing files, parse errors, non-mappings and bad keys in files are FrugalErrors naming the file."""
    with pytest.raises(FrugalError, match="recipe file not found"):
        Recipe.load(tmp_path / "missing.json")
    cases = {"bad.json": "{not json", "bad.yaml": "weights: [1, 2", "list.yaml": "- 1\n- 2\n",
             "key.json": json.dumps({"weights": {"bitz": 4}}), "val.yml": "weights:\n  bits: 5\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(FrugalError) as info:
            Recipe.load(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(FrugalError, match=r"recipe\.weights\.bitz"):
        Recipe.load(tmp_path / "key.json")
    with pytest.raises(FrugalError, match=r"recipe\.weights\.bits=5"):
        Recipe.load(tmp_path / "val.yml")


def test_unknown_keys_of_mixed_types():
    """Two unknown keys of different types (possible in YAML) are still a FrugalError."""
    raises_naming({1: "x", "bitz": 4}, "unknown key")


def test_version_1_recipes_keep_their_meaning():
    """A version 1 recipe (saved before storage.dtype and weights.signed_scale existed) reads as version 3
    with float32 storage (scales included) and the max|w| symmetric grid in `weights` and every override, so it gives the
    bytes it gave; keys it set itself win, and the caller's mapping is not changed."""
    v1 = {"version": 1, "weights": {"bits": 3}, "overrides": [{"match": "*.q_proj", "weights": {"bits": 8}},
                                                              {"match": "*.k_proj", "weights": {"signed_scale": True}}]}
    before = json.dumps(v1, sort_keys=True)
    r = Recipe.from_dict(v1)
    assert json.dumps(v1, sort_keys=True) == before
    assert r.version == RECIPE_VERSION and (r.storage.dtype, r.storage.scale_dtype) == ("model", "model")
    assert r.weights == WeightScheme(3, 128, True, signed_scale=False)
    assert r.overrides[0].weights.signed_scale is False and r.overrides[1].weights.signed_scale is True
    assert Recipe.from_dict(json.loads(r.to_json())) == r  # a written recipe is version 3 and round-trips
    assert Recipe.from_dict({"version": 1, "storage": {"dtype": "float16"}}).storage.dtype == "float16"


def test_version_2_recipes_store_scales_in_their_storage_dtype():
    """Version 2 stored "model" scales in storage.dtype: it reads as version 3 with scale_dtype = dtype."""
    import torch

    assert Recipe.from_dict({"version": 2}).storage.scale_dtype == "bfloat16"
    r = Recipe.from_dict({"version": 2, "storage": {"dtype": "float32"}})
    assert r.storage.scale_dtype == "float32" and r.scale_dtype_for(r.weights, torch.float32) == torch.float32
    assert Recipe().scale_dtype_for(Recipe().weights, torch.float32) == torch.float16
    with pytest.raises(FrugalError, match="storage.scale_dtype='int8'"):
        Recipe.from_dict({"storage": {"scale_dtype": "int8"}})
