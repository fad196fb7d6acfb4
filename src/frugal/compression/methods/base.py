"""The `Method` record every quantizer module defines, and what its rounding returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from frugal.errors import FrugalError

FLOAT_BYTES = 4  # float32 temporaries


@dataclass
class Quantized:
    """One rounded (out, in) weight: a QuantizedWeight or GGMLWeight, and what the solver reports."""

    weight: Any
    loss: float | None = None  # the solver's own objective (GPTQ's), None where it has none
    damp: float | None = None  # dampening actually used (GPTQ), None otherwise


def _copies_of_w(out_f: int, in_f: int) -> int:
    """Temporaries of rounding one (out, in) weight without a Hessian: three copies of W."""
    return 3 * out_f * in_f * FLOAT_BYTES


def _no_hessian(in_f: int) -> int:
    return 0


@dataclass(frozen=True)
class Method:
    """A weight quantizer.

    `quantize(w, h, scheme, recipe, scale_dtype, name)` rounds an (out, in) weight onto an integer grid;
    `quantize_ggml(w, h, ggml_type, recipe, name)` onto a GGML block type (None: integer grids only).
    `quantize_shared(ws, h, scheme, recipe, scale_dtype, names)`, where given, rounds several weights that
    share one Hessian (q/k/v, gate/up) in one call, each result equal to `quantize`'s on it alone.
    `h` is the (in, in) Hessian of the layer's inputs when `needs_hessian`, else None. `options` names the
    Recipe field holding the method's options dataclass. `clip`: whether recipe.clip applies; a method
    that refuses clip or GGML targets says why in `refusal`. Cost model for pre-flight: `work_bytes(out,
    in)` temporaries of rounding one layer, `hessian_bytes(in)` per layer kept while its block runs.
    `no_hessian`: the method (registry name) that rounds a layer that needs a Hessian but saw no
    calibration tokens (compression.statistics).
    """

    name: str
    summary: str
    quantize: Callable[..., Quantized]
    quantize_ggml: Callable[..., Quantized] | None = None
    quantize_shared: Callable[..., list[Quantized]] | None = None
    needs_calibration: bool = False
    needs_hessian: bool = False
    options: str | None = None
    clip: bool = True
    refusal: str = ""
    work_bytes: Callable[[int, int], int] = _copies_of_w
    hessian_bytes: Callable[[int], int] = _no_hessian
    no_hessian: str = "rtn"  # the method that rounds a layer no calibration input reached (needs_hessian)

    def check_recipe(self, recipe: Any) -> None:
        """Refuse recipe settings this method cannot take (one line naming the key)."""
        if (recipe.clip.enabled and not self.clip) or (recipe.gguf_type and self.quantize_ggml is None):
            raise FrugalError(f"recipe.method={self.name}: {self.refusal}")
