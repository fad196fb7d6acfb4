"""The `Transform` record every transform module defines, where its steps run, and what they see."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable


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
    reports, Hessians and (for transforms declaring `float_weights`) float weights by full layer name."""

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
    beside the quantized model's (the activations double). `float_weights`: its steps read
    ctx.float_weights (the engine keeps a copy of the block's float weights; rounding writes in place).
    `ggml` / `streaming`: why a GGUF target / the streaming engine cannot run it ("" when they can).
    `listed`: whether messages name it."""

    name: str  # its Recipe field
    summary: str
    enabled: Callable[[Any], bool]
    steps: dict[Place, Callable] = field(default_factory=dict)
    needs_calibration: bool = True
    float_targets: bool = False
    float_weights: bool = False
    check: Callable[[Any, Any], None] | None = None
    ggml: str = ""
    streaming: str = ""
    listed: bool = True  # named in messages (Recipe.describe); False for bookkeeping such as the storage dtype
