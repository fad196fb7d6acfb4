"""The transform registry: steps that change a model or a block around the quantizer, each with a
declared place in the block loop.

A transform is one module defining `TRANSFORM = Transform(...)` plus one line in `BUILTIN`. The engines
call the steps of the enabled transforms, in registry order, at their `Place`; the recipe validator,
pre-flight and the streaming engine read the flags (`needs_calibration`, `float_targets`, `ggml`,
`streaming`). Nothing tests a transform by name.
"""

from __future__ import annotations

from typing import Any, Callable

from frugal.compression.transforms.base import BlockContext, Place, Transform  # noqa: F401  (the record types)
from frugal.compression.registry import Registry


# One line per built-in transform; steps at the same place run in this order.
BUILTIN = (
    "frugal.compression.transforms.rotation",
    "frugal.compression.transforms.awq",
    "frugal.compression.transforms.refine",
    "frugal.compression.transforms.storage",  # last: rounds what the steps before it changed
)
REGISTRY = Registry("transform", BUILTIN, "TRANSFORM")
register = REGISTRY.register  # register(transform) adds one (its name must be new and a Recipe field)


def all_transforms() -> tuple[Transform, ...]:
    return tuple(REGISTRY.records().values())


def enabled(recipe: Any) -> tuple[Transform, ...]:
    """The transforms `recipe` asks for, in registry order."""
    return tuple(t for t in REGISTRY.records().values() if t.enabled(recipe))


def steps_at(recipe: Any, place: Place) -> list[Callable]:
    """The step functions of the enabled transforms at `place`, in registry order."""
    return [t.steps[place] for t in enabled(recipe) if place in t.steps]


def named_steps_at(recipe: Any, place: Place) -> list[tuple[str, Callable]]:
    """(transform name, step function) of the enabled transforms at `place`, in registry order."""
    return [(t.name, t.steps[place]) for t in enabled(recipe) if place in t.steps]


def float_weights(recipe: Any) -> bool:
    """Whether an enabled transform's AFTER_QUANTIZE steps read the block's float weights."""
    return any(t.float_weights for t in enabled(recipe))


def float_targets(recipe: Any) -> bool:
    """Whether an enabled transform needs the float model's block outputs."""
    return any(t.float_targets for t in enabled(recipe))
