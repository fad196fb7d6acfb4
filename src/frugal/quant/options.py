"""Option dataclasses of the quantization maths: the integer weight grid, the range search and each
method's settings. Strict and frozen; `validate(where)` raises a `FrugalError` naming the key. They hold
no tensors and import nothing heavy, so recipes (frugal.config) and the maths both build on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from frugal.errors import FrugalError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (-1, 32, 64, 128)  # -1: one scale per output channel
SCALE_DTYPES = ("model", "float16", "bfloat16", "float32")  # "model": the dtype of the weights

# the range rules of the numeric options: "must be <rule>" -> whether a value keeps it (NaN keeps none)
_RANGES = {
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in (0, 0.5]": lambda v: 0 < v <= 0.5,
}


def _check_ranges(where: str, options: Any, *rules: tuple[str, str]) -> None:
    """Raise a FrugalError `<where>.<name>=<value>: must be <rule>` for the first (name, rule) broken."""
    for name, rule in rules:
        value = getattr(options, name)
        if not _RANGES[rule](value):
            raise FrugalError(f"{where}.{name}={value}: must be {rule}")


@dataclass(frozen=True)
class WeightScheme:
    """Integer weight grid: `bits` per weight, one scale (and zero point) per `group_size` inputs.
    `signed_scale` (symmetric grids): the group's signed extreme lands on the lowest code, scale =
    extreme / -2^(b-1), using all 2^b levels (llama.cpp Q4_0, NNCF); false: max|w| / ((2^b - 1) / 2)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "model"
    signed_scale: bool = True

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
        _check_ranges(where, self, ("grid", ">= 1"), ("max_shrink", "in (0, 1]"))


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ (Frantar et al., 2022): dampening as a fraction of mean(diag H), act-order, lazy batches."""

    dampening: float = 0.01
    act_order: bool = True
    block_size: int = 128
    max_damp_retries: int = 5

    def validate(self, where: str) -> None:
        _check_ranges(where, self, ("dampening", "in (0, 1)"), ("block_size", ">= 1"), ("max_damp_retries", ">= 0"))


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
        _check_ranges(where, self, ("grid", ">= 1"), ("max_shrink", "in (0, 1]"))
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
        _check_ranges(where, self, ("iters", ">= 1"), ("lp_norm", "in (0, 1]"), ("beta", "> 0"), ("kappa", ">= 1"),
                      ("refits", ">= 0"))


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
        _check_ranges(where, self, ("iters", ">= 1"), ("batch_size", ">= 1"), ("eval_samples", ">= 1"),
                      ("eval_every", ">= 1"), ("lr", "in (0, 0.5]"), ("scale_lr", ">= 0"), ("max_seconds", ">= 0"))


ROTATIONS = ("none", "hadamard", "random")


@dataclass(frozen=True)
class RotationOptions:
    """Offline rotations fused into the weights before quantization (QuaRot/SpinQuant style, frugal.compression.transforms.rotation):
    `kind` none | hadamard | random for the residual stream (R1), its seed, and per-head value/output
    rotations (R2) with `per_head`."""

    kind: str = "none"
    seed: int = 0
    per_head: bool = True

    def validate(self, where: str = "rotation") -> None:
        if self.kind not in ROTATIONS:
            raise FrugalError(f"{where}.kind={self.kind!r}: choose one of {', '.join(ROTATIONS)}")
