"""Recipes: strict, versioned dataclasses that round-trip to JSON and YAML.

An unknown key, a wrong type or an out-of-range value is a `FrugalError` naming the key, never a
silent default.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugal.errors import FrugalError
from frugal.quant.options import (SCALE_DTYPES, SUPPORTED_BITS, SUPPORTED_GROUPS, AWQOptions, ClipSearch,  # noqa: F401
                                  GPTQOptions, HQQOptions, RefineOptions, ROTATIONS, RotationOptions,
                                  WeightScheme)

RECIPE_VERSION = 3
STORAGE_DTYPES = ("model", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class StorageOptions:
    """How what stays unquantized is held: `dtype` of the embeddings, head, norms and biases (rounded to it
    before calibration, so the measured model is the stored one; the weights to quantize are not rounded);
    `scale_dtype` of the scales when weights.scale_dtype is "model" (float16: three more mantissa bits
    than bfloat16, what GPTQ, GGUF, ONNX Runtime and OpenVINO hold; `--engine vllm` picks bfloat16, what
    vLLM computes in). "model" keeps the loaded model's dtype (float32 in frugal)."""

    dtype: str = "bfloat16"
    scale_dtype: str = "float16"

    def validate(self, where: str) -> None:
        for key in ("dtype", "scale_dtype"):
            if getattr(self, key) not in STORAGE_DTYPES:
                raise FrugalError(f"{where}.{key}={getattr(self, key)!r}: choose one of {', '.join(STORAGE_DTYPES)}")


# What older recipes meant by the keys later versions added (a saved recipe keeps its output bytes):
# version 1 had neither 16-bit storage nor signed symmetric scales; version 2 stored scales in storage.dtype.
V1_DEFAULTS = {("storage", "dtype"): "model", ("weights", "signed_scale"): False}


@dataclass(frozen=True)
class CalibrationOptions:
    """How many calibration sequences of how many tokens; which ones is decided by the recipe seed.
    `batch_size`: sequences per block forward (speed and memory only: the statistics are summed per
    sequence, so the output bytes do not depend on it)."""

    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8

    def validate(self, where: str) -> None:
        if self.num_samples < 1 or self.seq_len < 2:
            raise FrugalError(f"{where}: num_samples must be >= 1 and seq_len >= 2")
        if self.batch_size < 1:
            raise FrugalError(f"{where}.batch_size={self.batch_size}: must be >= 1")


@dataclass(frozen=True)
class LayerOverride:
    """A different grid for the layers whose names match `match` (fnmatch): an integer scheme, or a
    GGML block type (Q4_K, Q6_K, ...) when the recipe targets GGUF. Mixed precision is a list of these."""

    match: str = "*"
    weights: WeightScheme = field(default_factory=WeightScheme)
    ggml_type: str = ""

    def validate(self, where: str) -> None:
        self.weights.validate(f"{where}.weights")
        if self.ggml_type:
            from frugal.quant.ggml import TYPES

            if self.ggml_type not in TYPES:
                raise FrugalError(f"{where}.ggml_type={self.ggml_type!r}: GGML types are {', '.join(TYPES)}")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the compressed weights, apart from the model and the calibration text."""

    version: int = RECIPE_VERSION
    method: str = "gptq"
    weights: WeightScheme = field(default_factory=WeightScheme)
    clip: ClipSearch = field(default_factory=ClipSearch)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    hqq: HQQOptions = field(default_factory=HQQOptions)
    awq: AWQOptions = field(default_factory=AWQOptions)  # activation-aware scaling before RTN or GPTQ
    rotation: RotationOptions = field(default_factory=RotationOptions)  # fused before anything else
    refine: RefineOptions = field(default_factory=RefineOptions)  # block output-error refinement after the quantizer
    storage: StorageOptions = field(default_factory=StorageOptions)  # dtype of the unquantized tensors
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    ignore: tuple[str, ...] = ("lm_head",)  # fnmatch patterns of linear layers kept in float
    seed: int = 0
    # A llama.cpp file type ("Q4_K_M", "Q4_0", ...): round onto that type's GGML grid per tensor
    # (llama.cpp's per-tensor choice) instead of `weights`; the output can then only be GGUF.
    gguf_type: str = ""
    overrides: tuple[LayerOverride, ...] = ()  # first match wins; layers matching none use `weights`
    # A layer whose width the group size does not divide takes the largest group size that does (or one
    # scale per channel), as an override recorded here (compression.plan.fit_groups); true: refuse instead.
    strict_groups: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def needs_calibration(self) -> bool:
        """Whether compressing needs calibration inputs: the method's (GPTQ's Hessians) or an enabled
        transform's (AWQ's statistics, refinement's targets)."""
        from frugal.compression import methods, transforms

        return methods.get(self.method).needs_calibration or any(t.needs_calibration for t in transforms.enabled(self))

    def describe(self) -> str:
        """`method gptq, awq, refine`: the method and the enabled transforms, for messages."""
        from frugal.compression import transforms

        return ", ".join([f"method {self.method}"] + [t.name for t in transforms.enabled(self) if t.listed])

    def validate(self) -> None:
        from frugal.compression import methods, transforms

        if self.version != RECIPE_VERSION:
            raise FrugalError(f"recipe.version={self.version}: this frugal reads version {RECIPE_VERSION}")
        method = methods.get(self.method)
        self.weights.validate("recipe.weights")
        self.clip.validate("recipe.clip")
        for m in methods.REGISTRY.records().values():  # every method's options, whichever method it names
            if m.options is not None:
                getattr(self, m.options).validate(f"recipe.{m.options}")
        method.check_recipe(self)
        for t in transforms.all_transforms():
            getattr(self, t.name).validate(f"recipe.{t.name}")
            if t.enabled(self) and self.gguf_type and t.ggml:
                raise FrugalError(f"recipe.{t.name}.enabled with recipe.gguf_type: {t.ggml}")
        self.calibration.validate("recipe.calibration")
        for i, o in enumerate(self.overrides):
            o.validate(f"recipe.overrides[{i}]")
            if o.ggml_type and not self.gguf_type:
                raise FrugalError(f"recipe.overrides[{i}].ggml_type needs recipe.gguf_type (a GGUF target)")
        if self.gguf_type:
            from frugal.quant.ggml_policy import FILE_TYPES

            if self.gguf_type not in FILE_TYPES:
                raise FrugalError(f"recipe.gguf_type={self.gguf_type!r}: supported llama.cpp file types are "
                                  f"{', '.join(FILE_TYPES)}")

    def storage_dtype(self, weight_dtype: Any) -> Any:
        """The torch dtype unquantized tensors (and "model" scales) are stored in."""
        import torch

        return weight_dtype if self.storage.dtype == "model" else getattr(torch, self.storage.dtype)

    def cast_dtype(self) -> Any:
        """The dtype writers cast unquantized float tensors to; None when they stay float32 (frugal computes
        in float32, so "model" and "float32" change nothing)."""
        import torch

        dtype = self.storage_dtype(None)
        return None if dtype in (None, torch.float32) else dtype

    def scale_dtype_for(self, scheme: WeightScheme, weight_dtype: Any) -> Any:
        """The torch dtype of a layer's scales: the scheme's own, or with "model" storage.scale_dtype."""
        import torch

        stored = self.storage.scale_dtype
        return scheme.torch_scale_dtype(weight_dtype if stored == "model" else getattr(torch, stored))

    def override_for(self, layer: str) -> LayerOverride | None:
        """The first override whose pattern matches the layer name, or None."""
        import fnmatch

        return next((o for o in self.overrides if fnmatch.fnmatchcase(layer, o.match)), None)

    def scheme_for(self, layer: str) -> WeightScheme:
        """The integer grid of one layer: the first matching override's, else `weights`."""
        o = self.override_for(layer)
        return self.weights if o is None else o.weights

    def ggml_override(self, layer: str) -> str:
        """The GGML type the first matching override sets for this layer, or ""."""
        o = self.override_for(layer)
        return "" if o is None else o.ggml_type

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ignore"] = list(self.ignore)
        d["overrides"] = [dataclasses.asdict(o) for o in self.overrides]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        return _build(cls, upgrade(data), "recipe")

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a .json, .yaml or .yml file."""
        path = Path(path)
        if not path.is_file():
            raise FrugalError(f"{path}: recipe file not found")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # parse errors from either library
            raise FrugalError(f"{path}: cannot parse recipe: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise FrugalError(f"{path}: a recipe is a mapping of keys to values")
        try:
            return cls.from_dict(data)
        except FrugalError as e:
            raise FrugalError(f"{path}: {e}") from None


def upgrade(data: Any) -> Any:
    """An older recipe as the current version: the keys later versions added get the values that keep its
    meaning (version 1: V1_DEFAULTS; version 2: scales stored in storage.dtype)."""
    if not isinstance(data, dict) or data.get("version") not in (1, 2):
        return data
    data = json.loads(json.dumps(data))  # a deep copy; the caller's mapping stays as it was
    if data["version"] == 1:
        schemes = [data.setdefault("weights", {})] + [o.setdefault("weights", {}) for o in data.get("overrides") or []
                                                      if isinstance(o, dict)]
        for (section, key), value in V1_DEFAULTS.items():
            for target in (schemes if section == "weights" else [data.setdefault(section, {})]):
                if isinstance(target, dict):
                    target.setdefault(key, value)
    storage = data.setdefault("storage", {})
    if isinstance(storage, dict):
        storage.setdefault("scale_dtype", storage.get("dtype", StorageOptions.dtype))
    data["version"] = RECIPE_VERSION
    return data


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise FrugalError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((str(k) for k in set(data) - names))
    if unknown:
        raise FrugalError(f"unknown key '{where}.{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(item):
            if not isinstance(value, (list, tuple)):
                raise FrugalError(f"{where}: expected a list")
            return tuple(_build(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise FrugalError(f"{where}: expected a list of strings")
        return tuple(value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise FrugalError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


# The recipe `frugal compress` and `frugal.compress` use when given none: the best perplexity per minute of
# compression on the default model (AWQ scales + asymmetric GPTQ, W4 g64; docs/benchmarks.md "default-recipe").
# `Recipe()` itself stays the plain dataclass defaults (symmetric GPTQ g128), which option-by-option recipes build on.
RECOMMENDED: dict[str, Any] = {"method": "gptq", "weights": {"bits": 4, "group_size": 64, "symmetric": False},
                               "awq": {"enabled": True, "clip": False}}


def recommended() -> dict[str, Any]:
    """The recommended recipe as a full recipe mapping (a fresh copy)."""
    d = Recipe().to_dict()
    for section, values in RECOMMENDED.items():
        d[section] = {**d[section], **values} if isinstance(values, dict) else values
    return d


def as_recipe(recipe: "Recipe | dict | str | Path | None") -> "Recipe":
    """A Recipe from a Recipe, a mapping, a .json/.yaml path, or None (the recommended recipe)."""
    if recipe is None:
        return Recipe.from_dict(recommended())
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.load(recipe)
