"""The transform registry: steps that change a model or a block around the quantizer, each with a
declared place in the block loop.

A transform is one module defining `TRANSFORM = Transform(...)` plus one line in `BUILTIN`. The engines
call the steps of the enabled transforms, in registry order, at their `Place`; the recipe validator,
pre-flight and the streaming engine read the flags (`needs_calibration`, `float_targets`, `ggml`,
`streaming`). Nothing tests a transform by name.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from frugal.errors import FrugalError


class Place(enum.IntEnum):
    """Where a step runs. MODEL: once on the whole float model, before calibration. In each block:
    BLOCK_START on its float weights before anything changes them, BEFORE_QUANTIZE after the
    preceding steps and before the layers are rounded, AFTER_QUANTIZE on the rounded layers."""

    MODEL = 0
    BLOCK_START = 1
    BEFORE_QUANTIZE = 2
    AFTER_QUANTIZE = 3


@dataclass
class BlockContext:
    """What a block step sees and may change: the block, its calibration inputs and call arguments, the
    float model's outputs of this block (`targets`), and after rounding the quantized weights, layer
    reports, float weights and Hessians by full layer name."""

    block: Any
    prefix: str
    recipe: Any
    hidden: list | None
    args: tuple
    kw: dict
    targets: list | None = None
    layers: dict = field(default_factory=dict)
    quantized: dict = field(default_factory=dict)
    reports: dict = field(default_factory=dict)
    float_weights: dict = field(default_factory=dict)
    hessians: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Transform:
    """A registered step. `enabled(recipe)` says whether the recipe asks for it; `steps` maps places to
    functions (MODEL: f(model, recipe); block places: f(ctx: BlockContext)); `check(model, recipe)`
    refuses a model before any work. `float_targets`: the engine carries the float model's hidden states
    beside the quantized model's (the activations double). `ggml` / `streaming`: why a GGUF target / the
    streaming engine cannot run it ("" when they can)."""

    name: str  # its Recipe field
    summary: str
    enabled: Callable[[Any], bool]
    steps: dict[Place, Callable] = field(default_factory=dict)
    needs_calibration: bool = True
    float_targets: bool = False
    check: Callable[[Any, Any], None] | None = None
    ggml: str = ""
    streaming: str = ""


# One line per built-in transform; steps at the same place run in this order.
BUILTIN = (
    "frugal.compression.transforms.rotation",
    "frugal.compression.transforms.awq",
    "frugal.compression.transforms.refine",
)
_REGISTRY: dict[str, Transform] = {}


def _registry() -> dict[str, Transform]:
    if not _REGISTRY:
        for module in BUILTIN:
            t = importlib.import_module(module).TRANSFORM
            _REGISTRY[t.name] = t
    return _REGISTRY


def register(transform: Transform) -> Transform:
    """Add a transform (its name must be new and a Recipe field)."""
    if transform.name in _registry() and _REGISTRY[transform.name] is not transform:
        raise FrugalError(f"transform {transform.name!r} is already registered")
    _REGISTRY[transform.name] = transform
    return transform


def all_transforms() -> tuple[Transform, ...]:
    return tuple(_registry().values())


def enabled(recipe: Any) -> tuple[Transform, ...]:
    """The transforms `recipe` asks for, in registry order."""
    return tuple(t for t in _registry().values() if t.enabled(recipe))


def steps_at(recipe: Any, place: Place) -> list[Callable]:
    """The step functions of the enabled transforms at `place`, in registry order."""
    return [t.steps[place] for t in enabled(recipe) if place in t.steps]


def float_targets(recipe: Any) -> bool:
    """Whether an enabled transform needs the float model's block outputs."""
    return any(t.float_targets for t in enabled(recipe))
