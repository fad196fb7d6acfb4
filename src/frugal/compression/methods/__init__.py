"""The quantizer registry: one `Method` record per weight-rounding method.

Every stage reads the records instead of comparing method names: the recipe validator (known names,
what a method refuses), the CLI (choices and help), pre-flight (each method's cost model), the analysis
(whether candidates are rounded with Hessians) and both engines (which inputs to collect, which function
rounds a layer). A method is one module defining `METHOD = Method(...)` plus one line in `BUILTIN`;
code outside frugal adds one with `register(method)`.

Record modules import only light modules at the top (the maths is imported when a layer is rounded),
so the recipe validator can read the registry without importing torch.
"""

from __future__ import annotations

import importlib
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
    `h` is the (in, in) Hessian of the layer's inputs when `needs_hessian`, else None. `options` names the
    Recipe field holding the method's options dataclass. `clip`: whether recipe.clip applies; a method
    that refuses clip or GGML targets says why in `refusal`. Cost model for pre-flight: `work_bytes(out,
    in)` temporaries of rounding one layer, `hessian_bytes(in)` per layer kept while its block runs.
    """

    name: str
    summary: str
    quantize: Callable[..., Quantized]
    quantize_ggml: Callable[..., Quantized] | None = None
    needs_calibration: bool = False
    needs_hessian: bool = False
    options: str | None = None
    clip: bool = True
    refusal: str = ""
    work_bytes: Callable[[int, int], int] = _copies_of_w
    hessian_bytes: Callable[[int], int] = _no_hessian

    def check_recipe(self, recipe: Any) -> None:
        """Refuse recipe settings this method cannot take (one line naming the key)."""
        if (recipe.clip.enabled and not self.clip) or (recipe.gguf_type and self.quantize_ggml is None):
            raise FrugalError(f"recipe.method={self.name}: {self.refusal}")


# One line per built-in method, in the order `--help` lists them (the first is the default).
BUILTIN = (
    "frugal.compression.methods.gptq",
    "frugal.compression.methods.rtn",
    "frugal.compression.methods.hqq",
)
_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (its name must be new); returns it, so a module can write `METHOD = register(...)`."""
    if method.name in _registry() and _REGISTRY[method.name] is not method:
        raise FrugalError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def _registry() -> dict[str, Method]:
    if not _REGISTRY:
        for module in BUILTIN:
            m = importlib.import_module(module).METHOD
            _REGISTRY[m.name] = m
    return _REGISTRY


def names() -> tuple[str, ...]:
    """Registered method names, built-ins first."""
    return tuple(_registry())


def get(name: str, where: str = "recipe.method") -> Method:
    """The method called `name`, or a FrugalError listing the known ones."""
    methods = _registry()
    if name not in methods:
        raise FrugalError(f"{where}={name!r}: known methods are {', '.join(methods)}")
    return methods[name]


def help_text() -> str:
    """`name (summary)` for every method, for the CLI."""
    return ", ".join(f"{m.name} ({m.summary})" for m in _registry().values())
