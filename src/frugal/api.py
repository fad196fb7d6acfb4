"""The Python API: everything the `frugal` command does, with the same errors.

    frugal.compress(model, recipe, calibration, budget=..., max_kl=..., stream=...)
    frugal.analyze(model, ...)        frugal.export(directory, fmt, out)        frugal.evaluate(...)
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from frugal.compression.result import Compressed, CompressionReport
from frugal.config import Recipe, as_recipe
from frugal.errors import FrugalError

log = logging.getLogger(__name__)


def compress(model_or_path: Any = None, recipe: Recipe | dict | str | Path | None = None, calibration: Any = None,
             *, tokenizer: Any = None, allow_pickle: bool = False, inplace: bool = False,
             formats: tuple[str, ...] = ()) -> Compressed:
    """Compress a model (a transformers model, a directory, a GGUF file, or None for the default).

    `calibration`: a text file (default: shared wikitext-2 valid.txt), a (N, L) tensor of token ids,
    or "data-free" to calibrate on sequences the model generates itself. `formats`: export formats
    the result must be writable to; checked before any work.
    """
    from frugal import calibrate
    from frugal.compression import transforms
    from frugal.compression.engine import compress_model
    from frugal.compression.plan import check_plan
    from frugal.compression.transforms import Place

    recipe = as_recipe(recipe)
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path if inplace else copy.deepcopy(model_or_path)
        source = type(model).__name__
    else:
        from frugal.load.model import load_model

        loaded = load_model(model_or_path, allow_pickle=allow_pickle)
        model, tokenizer, source = loaded.model, tokenizer or loaded.tokenizer, str(loaded.source)
    check_plan(model, recipe, formats)
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    for step in transforms.steps_at(recipe, Place.MODEL):  # function-preserving: calibration sees the result
        step(model, recipe)
    samples, calib_info = calibrate.for_recipe(calibration, tokenizer, model, recipe)
    quantized, layers = compress_model(model, recipe, samples)
    if not quantized:
        raise FrugalError("no linear layer was quantized (check recipe.ignore)")
    report = CompressionReport(recipe, source, calib_info, layers, seconds=time.perf_counter() - t0)
    return Compressed(model=model, tokenizer=tokenizer, quantized=quantized, report=report)


