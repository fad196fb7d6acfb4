"""What a compression produces: per-layer reports, the run's report (saved as frugal.json) and the
`Compressed` result that every export format writes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dataclasses

from frugal.config import Recipe
from frugal.version import __version__

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What quantizing one linear layer cost."""

    bits: int
    group_size: int
    symmetric: bool
    weight_rel_error: float  # ||W - Q||_F / ||W||_F
    output_rel_error: float | None  # tr(dW H dW^T) / tr(W H W^T) on calibration inputs; None without H
    gptq_loss: float | None = None
    damp: float | None = None
    seconds: float = 0.0
    ggml_type: str | None = None  # set when the layer was rounded onto a GGML grid (recipe.gguf_type)
    tokens: int | None = None  # MoE experts and unreached layers: the calibration tokens it saw ...
    statistics: str | None = None  # ... and its Hessian: own, pooled or none (compression.statistics)

    def to_dict(self) -> dict[str, Any]:
        """Every field; `tokens` and `statistics` only where set (dense layers' reports stay as they were)."""
        return {k: v for k, v in self.__dict__.items() if v is not None or k not in _WHERE_SET}


_WHERE_SET = frozenset({"tokens", "statistics"})


REPORT_VERSION = 1


@dataclass
class CompressionReport:
    """What was done and what it cost per layer; saved (without timings) as frugal.json."""

    recipe: Recipe
    source: str
    calibration: dict[str, Any]
    layers: dict[str, LayerReport]
    seconds: float = 0.0
    mixed: dict[str, Any] | None = None  # the mixed-precision plan (frugal compress --budget/--max-kl)
    stages: dict[str, float] = field(default_factory=dict)  # wall seconds per stage (compression.timing)

    def to_dict(self, timings: bool = False) -> dict[str, Any]:
        import compressed_tensors
        import torch
        import transformers

        layers = {n: r.to_dict() for n, r in self.layers.items()}
        if not timings:
            for r in layers.values():
                r.pop("seconds")
        d = {
            "format_version": REPORT_VERSION,
            "recipe": self.recipe.to_dict(),
            "seed": self.recipe.seed,
            "source": self.source,
            "calibration": self.calibration,
            "versions": {"frugal": __version__, "torch": torch.__version__.split("+")[0],
                         "transformers": transformers.__version__,
                         "compressed_tensors": compressed_tensors.__version__},
            "layers": layers,
        }
        if self.mixed is not None:
            d["mixed_precision"] = self.mixed
        if timings:
            d["seconds"] = self.seconds
            d["stages"] = dict(self.stages)
        return d


@dataclass
class Compressed:
    """A compressed model: `model` holds the dequantized weights, `quantized` the integer form."""

    model: Any
    tokenizer: Any
    quantized: dict[str, Any]  # QuantizedWeight or GGMLWeight by layer name
    report: CompressionReport
    extra: dict[str, Any] = field(default_factory=dict)

    def storage_dtype(self) -> Any:
        """The dtype the unquantized tensors are stored in (recipe.storage), None when they stay as they are."""
        return self.report.recipe.cast_dtype()

    def save(self, out: str | Path, overwrite: bool = False, fmt: str = "compressed-tensors") -> Path:
        """Write the model in format `fmt` (with frugal.json) into `out`, atomically (never into, over or
        around the model it was compressed from)."""
        from frugal.atomic import atomic_dir
        from frugal.exporters import check, writer

        write = writer(fmt)
        check(fmt, self.model, self.report.recipe)
        with atomic_dir(out, overwrite, sources=(self.report.source,)) as tmp:
            write(self, tmp)
        log.info("wrote %s", out)
        return Path(out)


def layer_reports(layers: dict[str, dict]) -> dict[str, LayerReport]:
    known = {f.name for f in dataclasses.fields(LayerReport)}
    return {n: LayerReport(**{k: v for k, v in d.items() if k in known}) for n, d in layers.items()}


