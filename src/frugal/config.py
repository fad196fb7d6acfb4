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

from .errors import FrugalError

RECIPE_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (-1, 32, 64, 128)  # -1: one scale per output channel
SCALE_DTYPES = ("model", "float16", "bfloat16", "float32")  # "model": the dtype of the weights


@dataclass(frozen=True)
class WeightScheme:
    """Integer weight grid: `bits` per weight, one scale (and zero point) per `group_size` inputs."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "model"

    def torch_scale_dtype(self, weight_dtype: "Any") -> "Any":
        """The torch dtype scales are stored (and quantized against) in."""
        import torch

        return weight_dtype if self.scale_dtype == "model" else getattr(torch, self.scale_dtype)

    def validate(self, where: str) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise FrugalError(f"{where}.bits={self.bits}: supported bit widths are {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUPS:
            raise FrugalError(
                f"{where}.group_size={self.group_size}: supported group sizes are "
                f"{SUPPORTED_GROUPS} (-1 = per output channel)"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise FrugalError(f"{where}.scale_dtype={self.scale_dtype!r}: choose one of {', '.join(SCALE_DTYPES)}")


@dataclass(frozen=True)
class ClipSearch:
    """MSE-optimal clipping: shrink each group's range by factors in [max_shrink, 1] and keep the best."""

    enabled: bool = False
    grid: int = 40
    max_shrink: float = 0.75

    def validate(self, where: str) -> None:
        if self.grid < 1:
            raise FrugalError(f"{where}.grid={self.grid}: must be >= 1")
        if not 0.0 < self.max_shrink <= 1.0:
            raise FrugalError(f"{where}.max_shrink={self.max_shrink}: must be in (0, 1]")


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ (Frantar et al., 2022): dampening as a fraction of mean(diag H), act-order, lazy batches."""

    dampening: float = 0.01
    act_order: bool = True
    block_size: int = 128
    max_damp_retries: int = 5

    def validate(self, where: str) -> None:
        if not 0.0 < self.dampening < 1.0:
            raise FrugalError(f"{where}.dampening={self.dampening}: must be in (0, 1)")
        if self.block_size < 1:
            raise FrugalError(f"{where}.block_size={self.block_size}: must be >= 1")
        if self.max_damp_retries < 0:
            raise FrugalError(f"{where}.max_damp_retries={self.max_damp_retries}: must be >= 0")


@dataclass(frozen=True)
class AWQOptions:
    """AWQ (Lin et al., 2023): per-input-channel scales s = mean|x|^alpha, alpha searched on `grid` points
    in [0, 1), folded into the preceding op; then (with `clip`) a per-group range search over `grid`
    factors in [max_shrink, 1] minimising the output error. Statistics use at most `max_samples`
    calibration samples and `max_tokens` tokens (spread evenly over them)."""

    enabled: bool = False
    grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    max_samples: int = 128
    max_tokens: int = 8192

    def validate(self, where: str) -> None:
        if self.grid < 1:
            raise FrugalError(f"{where}.grid={self.grid}: must be >= 1")
        if not 0.0 < self.max_shrink <= 1.0:
            raise FrugalError(f"{where}.max_shrink={self.max_shrink}: must be in (0, 1]")
        if self.max_samples < 1 or self.max_tokens < 1:
            raise FrugalError(f"{where}: max_samples and max_tokens must be >= 1")


@dataclass(frozen=True)
class HQQOptions:
    """HQQ (Badri & Shaji, 2023): half-quadratic l_p solver settings (the paper's defaults) and the number
    of least-squares scale refits after the zero point is made an integer."""

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    refits: int = 2

    def validate(self, where: str) -> None:
        if self.iters < 1:
            raise FrugalError(f"{where}.iters={self.iters}: must be >= 1")
        if not 0.0 < self.lp_norm <= 1.0:
            raise FrugalError(f"{where}.lp_norm={self.lp_norm}: must be in (0, 1]")
        if not self.beta > 0.0:
            raise FrugalError(f"{where}.beta={self.beta}: must be > 0")
        if not self.kappa >= 1.0:
            raise FrugalError(f"{where}.kappa={self.kappa}: must be >= 1")
        if self.refits < 0:
            raise FrugalError(f"{where}.refits={self.refits}: must be >= 0")


ROTATIONS = ("none", "hadamard", "random")


@dataclass(frozen=True)
class RotationOptions:
    """Offline rotations fused into the weights before quantization (QuaRot/SpinQuant style, frugal.rotate):
    `kind` none | hadamard | random for the residual stream (R1), its seed, and per-head value/output
    rotations (R2) with `per_head`."""

    kind: str = "none"
    seed: int = 0
    per_head: bool = True

    def validate(self, where: str = "rotation") -> None:
        if self.kind not in ROTATIONS:
            raise FrugalError(f"{where}.kind={self.kind!r}: choose one of {', '.join(ROTATIONS)}")


@dataclass(frozen=True)
class RefineOptions:
    """Block-wise output-error refinement after the first quantizer (SignRound, Cheng et al. 2023;
    quant/refine.py): `iters` signed-gradient steps of `batch_size` calibration samples each on the rounding
    offsets (each code moves at most one step) and, with `scales`, one multiplier per group; with `norms`,
    per-channel multipliers of the block's 1-D float parameters (norm weights, biases); learning rate
    `lr` decaying linearly, `scale_lr` for the multipliers (0: same as `lr`). The best iterate
    on `eval_samples` held-out samples (measured every `eval_every` steps) is kept, never worse than the
    start. `max_seconds` stops a block early (0: no limit; a stop makes the result depend on the machine's
    speed); `seed` orders the batches."""

    enabled: bool = False
    iters: int = 50
    lr: float = 0.005
    scale_lr: float = 0.0
    batch_size: int = 1
    scales: bool = True
    norms: bool = False
    eval_samples: int = 4
    eval_every: int = 5
    max_seconds: float = 0.0
    seed: int = 0

    def validate(self, where: str) -> None:
        for key in ("iters", "batch_size", "eval_samples", "eval_every"):
            if getattr(self, key) < 1:
                raise FrugalError(f"{where}.{key}={getattr(self, key)}: must be >= 1")
        if not 0.0 < self.lr <= 0.5:
            raise FrugalError(f"{where}.lr={self.lr}: must be in (0, 0.5]")
        for key in ("scale_lr", "max_seconds"):
            if not getattr(self, key) >= 0.0:
                raise FrugalError(f"{where}.{key}={getattr(self, key)}: must be >= 0")


@dataclass(frozen=True)
class CalibrationOptions:
    """How many calibration sequences of how many tokens; which ones is decided by the recipe seed."""

    num_samples: int = 128
    seq_len: int = 512

    def validate(self, where: str) -> None:
        if self.num_samples < 1 or self.seq_len < 2:
            raise FrugalError(f"{where}: num_samples must be >= 1 and seq_len >= 2")


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
            from .quant.ggml import TYPES

            if self.ggml_type not in TYPES:
                raise FrugalError(f"{where}.ggml_type={self.ggml_type!r}: GGML types are {', '.join(TYPES)}")


METHODS = ("rtn", "gptq", "hqq")  # hqq: calibration-free, like rtn


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
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    ignore: tuple[str, ...] = ("lm_head",)  # fnmatch patterns of linear layers kept in float
    seed: int = 0
    # A llama.cpp file type ("Q4_K_M", "Q4_0", ...): round onto that type's GGML grid per tensor
    # (llama.cpp's per-tensor choice) instead of `weights`; the output can then only be GGUF.
    gguf_type: str = ""
    overrides: tuple[LayerOverride, ...] = ()  # first match wins; layers matching none use `weights`

    def __post_init__(self) -> None:
        self.validate()

    @property
    def needs_calibration(self) -> bool:
        """Whether compressing needs calibration inputs: GPTQ's Hessians, AWQ's statistics, refinement's targets."""
        return self.method == "gptq" or self.awq.enabled or self.refine.enabled

    def validate(self) -> None:
        if self.version != RECIPE_VERSION:
            raise FrugalError(f"recipe.version={self.version}: this frugal reads version {RECIPE_VERSION}")
        if self.method not in METHODS:
            raise FrugalError(f"recipe.method={self.method!r}: known methods are {', '.join(METHODS)}")
        self.weights.validate("recipe.weights")
        self.clip.validate("recipe.clip")
        self.gptq.validate("recipe.gptq")
        self.hqq.validate("recipe.hqq")
        if self.method == "hqq" and (self.clip.enabled or self.gguf_type):
            raise FrugalError("recipe.method=hqq: its solver chooses the range itself (no recipe.clip) and "
                              "rounds integer grids only (no recipe.gguf_type)")
        self.awq.validate("recipe.awq")
        self.rotation.validate("recipe.rotation")
        if self.awq.enabled and self.gguf_type:
            raise FrugalError("recipe.awq.enabled with recipe.gguf_type: AWQ searches integer grids only")
        self.refine.validate("recipe.refine")
        if self.refine.enabled and self.gguf_type:
            raise FrugalError("recipe.refine.enabled with recipe.gguf_type: refinement moves integer-grid codes only")
        self.calibration.validate("recipe.calibration")
        for i, o in enumerate(self.overrides):
            o.validate(f"recipe.overrides[{i}]")
            if o.ggml_type and not self.gguf_type:
                raise FrugalError(f"recipe.overrides[{i}].ggml_type needs recipe.gguf_type (a GGUF target)")
        if self.gguf_type:
            from .quant.ggml_policy import FILE_TYPES

            if self.gguf_type not in FILE_TYPES:
                raise FrugalError(f"recipe.gguf_type={self.gguf_type!r}: supported llama.cpp file types are "
                                  f"{', '.join(FILE_TYPES)}")

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
        return _build(cls, data, "recipe")

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
