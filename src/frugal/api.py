"""The one-call Python interface: `frugal.compress(model_or_path, recipe, calibration)`."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .blocks import check_group_fit, quantizable_linears
from .config import Recipe
from .engine import LayerReport, compress_model
from .errors import FrugalError
from .quant.grid import QuantizedWeight

log = logging.getLogger(__name__)

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

    def to_dict(self, timings: bool = False) -> dict[str, Any]:
        import compressed_tensors
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
        return d


@dataclass
class Compressed:
    """A compressed model: `model` holds the dequantized weights, `quantized` the integer form."""

    model: Any
    tokenizer: Any
    quantized: dict[str, QuantizedWeight]
    report: CompressionReport
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, out: str | Path, overwrite: bool = False, fmt: str = "compressed-tensors") -> Path:
        """Write the model in format `fmt` (with frugal.json) into `out`, atomically."""
        from .atomic import atomic_dir
        from .export import check, writer

        write = writer(fmt)
        check(fmt, self.model, self.report.recipe)
        with atomic_dir(out, overwrite) as tmp:
            write(self, tmp)
        log.info("wrote %s", out)
        return Path(out)


def _recipe(recipe: Recipe | dict | str | Path | None) -> Recipe:
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.load(recipe)


def _calibration(calibration, loaded_tok, model, recipe: Recipe) -> tuple[torch.Tensor | None, dict]:
    """Token ids (N, L) for the recipe, and a description for frugal.json."""
    from . import calibrate

    n, seq = recipe.calibration.num_samples, recipe.calibration.seq_len
    if not recipe.needs_calibration:
        return None, {"source": None}
    if isinstance(calibration, torch.Tensor):
        return calibration.long(), {"source": "tensor", "num_samples": calibration.shape[0], "seq_len": calibration.shape[1]}
    if calibration is False or calibration == "data-free":
        return calibrate.data_free(model, n, seq, recipe.seed), {"source": "data-free", "num_samples": n, "seq_len": seq}
    path = Path(calibration) if calibration is not None else calibrate.default_text()
    ids = calibrate.from_text(loaded_tok, path, n, seq, recipe.seed)
    return ids, {"source": path.name, "num_samples": n, "seq_len": seq}


def check_plan(model: Any, recipe: Recipe, formats: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a recipe the model's layers or the requested formats cannot take."""
    from .export import check

    if recipe.gguf_type:
        from .engine import gguf_layer_types

        gguf_layer_types(model, recipe)  # every tensor must fit a GGML type
    else:
        by_scheme: dict = {}
        for name, lin in quantizable_linears(model, recipe.ignore).items():
            by_scheme.setdefault(recipe.scheme_for(name), {})[name] = lin
        for scheme, layers in by_scheme.items():
            check_group_fit(layers, scheme)
    if recipe.rotation.kind != "none":
        from .rotate import check as rotation_check

        rotation_check(model)
        if recipe.method != "gptq":
            log.warning("rotation with %s: on the default model rotation helps GPTQ (W4 g64 ppl 48.3 -> 41.7) but "
                        "hurts round-to-nearest (52.0 -> 82.0); see docs/design.md", recipe.method)
    if recipe.awq.enabled:
        from .awq import check as awq_check

        awq_check(model)
    for fmt in formats:
        check(fmt, model, recipe)


def compress(model_or_path: Any = None, recipe: Recipe | dict | str | Path | None = None, calibration: Any = None,
             *, tokenizer: Any = None, allow_pickle: bool = False, inplace: bool = False,
             formats: tuple[str, ...] = ()) -> Compressed:
    """Compress a model (a transformers model, a directory, a GGUF file, or None for the default).

    `calibration`: a text file (default: shared wikitext-2 valid.txt), a (N, L) tensor of token ids,
    or "data-free" to calibrate on sequences the model generates itself. `formats`: export formats
    the result must be writable to; checked before any work.
    """
    recipe = _recipe(recipe)
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path if inplace else copy.deepcopy(model_or_path)
        source = type(model).__name__
    else:
        from .load import load_model

        loaded = load_model(model_or_path, allow_pickle=allow_pickle)
        model, tokenizer, source = loaded.model, tokenizer or loaded.tokenizer, str(loaded.source)
    check_plan(model, recipe, formats)
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    if recipe.rotation.kind != "none":
        from .rotate import rotate_model

        rotate_model(model, recipe.rotation)  # function-preserving: calibration and GPTQ see the rotated model
    samples, calib_info = _calibration(calibration, tokenizer, model, recipe)
    quantized, layers = compress_model(model, recipe, samples)
    if not quantized:
        raise FrugalError("no linear layer was quantized (check recipe.ignore)")
    report = CompressionReport(recipe, source, calib_info, layers, seconds=time.perf_counter() - t0)
    return Compressed(model=model, tokenizer=tokenizer, quantized=quantized, report=report)


def _layer_reports(layers: dict[str, dict]) -> dict[str, LayerReport]:
    import dataclasses

    known = {f.name for f in dataclasses.fields(LayerReport)}
    return {n: LayerReport(**{k: v for k, v in d.items() if k in known}) for n, d in layers.items()}


def read_compressed_tensors(directory: Path) -> dict[str, QuantizedWeight]:
    """The integer weights of a frugal compressed-tensors directory, unpacked exactly."""
    import json
    import re

    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    cfg = json.loads((directory / "config.json").read_text()).get("quantization_config", {})
    args = {}
    for group in cfg.get("config_groups", {}).values():
        args.update({t: group["weights"] for t in group["targets"]})
    out: dict[str, QuantizedWeight] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if not key.endswith(".weight_packed"):
                    continue
                name = key[: -len(".weight_packed")]
                a = args.get("Linear") or next(v for t, v in args.items() if t.startswith("re:") and
                                                re.match(t[3:], name))
                shape = torch.Size(st.get_tensor(f"{name}.weight_shape").tolist())
                q = unpack_from_int32(st.get_tensor(key), a["num_bits"], shape).to(torch.int8)
                zp = None
                if not a["symmetric"]:
                    packed = st.get_tensor(f"{name}.weight_zero_point")
                    scale = st.get_tensor(f"{name}.weight_scale")
                    zp = unpack_from_int32(packed, a["num_bits"], scale.shape, packed_dim=0).to(torch.int8)
                out[name] = QuantizedWeight(q, st.get_tensor(f"{name}.weight_scale"), zp, a["num_bits"],
                                            a["group_size"] or -1)
    return out


def load_compressed(directory: str | Path) -> Compressed:
    """A frugal compressed-tensors output directory back as a `Compressed` (for `frugal export`)."""
    import json

    from .load import load_model

    directory = Path(directory)
    meta = directory / "frugal.json"
    if not (directory / "config.json").is_file() or not meta.is_file():
        raise FrugalError(f"{directory}: not a frugal compressed-tensors directory (needs config.json and frugal.json)")
    report = json.loads(meta.read_text())
    recipe = Recipe.from_dict(report["recipe"])
    if recipe.gguf_type:
        raise FrugalError(f"{directory}: compressed onto GGML grids ({recipe.gguf_type}); it exists only as GGUF")
    loaded = load_model(directory)
    quantized = read_compressed_tensors(directory)
    if not quantized:
        raise FrugalError(f"{directory}: no packed weights found (was it written with --format compressed-tensors?)")
    modules = dict(loaded.model.named_modules())
    with torch.no_grad():  # frugal's arithmetic (float32), not the loader's (which may round in float16)
        for name, qw in quantized.items():
            modules[name].weight.data = qw.dequantize(modules[name].weight.dtype)
    rep = CompressionReport(recipe, report.get("source", str(directory)), report.get("calibration", {}),
                            _layer_reports(report.get("layers", {})))
    return Compressed(model=loaded.model, tokenizer=loaded.tokenizer, quantized=quantized, report=rep)
