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

from frugal.compression.methods.base import FLOAT_BYTES, Method, Quantized  # noqa: F401  (the record types)
from frugal.compression.registry import Registry
from frugal.errors import FrugalError

# One line per built-in method, in the order `--help` lists them (the first is the default).
BUILTIN = (
    "frugal.compression.methods.gptq",
    "frugal.compression.methods.rtn",
    "frugal.compression.methods.hqq",
)
REGISTRY = Registry("method", BUILTIN, "METHOD")
register = REGISTRY.register  # register(method) adds one (its name must be new) and returns it


def names() -> tuple[str, ...]:
    """Registered method names, built-ins first."""
    return tuple(REGISTRY.records())


def get(name: str, where: str = "recipe.method") -> Method:
    """The method called `name`, or a FrugalError listing the known ones."""
    methods = REGISTRY.records()
    if name not in methods:
        raise FrugalError(f"{where}={name!r}: known methods are {', '.join(methods)}")
    return methods[name]


def help_text() -> str:
    """`name (summary)` for every method, for the CLI."""
    return ", ".join(f"{m.name} ({m.summary})" for m in REGISTRY.records().values())
