"""`frugal info`: architecture, parameters, layers that would be quantized, memory estimate, and with
--project the projected compression time (from one block measured here). A config.json alone is enough."""

from __future__ import annotations

import argparse
from pathlib import Path


def _config_only(spec: str | None) -> bool:
    """A JSON file, or a directory with config.json and no weights: shapes without a checkpoint."""
    if spec is None:
        return False
    p = Path(spec)
    if p.is_file():
        return p.suffix == ".json"
    from frugal.load.model import PICKLE_SUFFIXES

    weights = {".safetensors", ".gguf", *PICKLE_SUFFIXES}
    return (p / "config.json").is_file() and not any(f.suffix in weights for f in p.iterdir())


def _recipe(a: argparse.Namespace):
    from frugal.config import Recipe, recommended

    if a.project == "best":
        r = recommended()
        r["calibration"] = {**r.get("calibration", {}), "num_samples": a.samples, "seq_len": a.calib_len}
        return Recipe.from_dict(r)
    return Recipe.from_dict({"method": a.project or "gptq", "weights": {"bits": a.bits, "group_size": a.group_size},
                             "calibration": {"num_samples": a.samples, "seq_len": a.calib_len}})


def _model(a: argparse.Namespace):
    """(model, config, label, checkpoint directory or None): a loaded model, or meta tensors of a config."""
    if _config_only(a.model):
        from frugal.compression.projection import load_config, meta_model

        cfg = load_config(a.model)
        return meta_model(cfg), cfg, f"{a.model} (configuration only)", None
    from frugal.load.model import load_model

    loaded = load_model(a.model, allow_pickle=a.allow_pickle)
    return loaded.model, loaded.model.config, str(loaded.source), loaded.path


def cmd_info(a: argparse.Namespace) -> int:
    from frugal.config import WeightScheme
    from frugal.evaluation.sizes import compression_estimate, model_bytes
    from frugal.load.blocks import find_blocks, quantizable_linears
    from frugal.report.table import fmt_bytes, table

    scheme = WeightScheme(a.bits, a.group_size)
    scheme.validate("info")
    recipe = _recipe(a)
    m, cfg, label, path = _model(a)
    blocks_name, blocks = find_blocks(m)
    layers = quantizable_linears(m, ("lm_head",))
    n_params = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    est = compression_estimate(m, layers, scheme, a.samples, a.calib_len)
    misfit = [n for n, l in layers.items() if a.group_size != -1 and l.in_features % a.group_size]
    kinds: dict[str, list] = {}  # layer kind -> [count, first layer of that kind]
    for n, lin in layers.items():
        key = n[len(blocks_name) + 1:].split(".", 1)[1] if n.startswith(blocks_name + ".") else n
        kinds.setdefault(key, [0, lin])[0] += 1
    print(f"{label}: {cfg.model_type} ({type(m).__name__}), {n_params / 1e6:.1f} M parameters, "
          f"{len(blocks)} blocks at '{blocks_name}'")
    print(table(["layer (per block)", "count", "in", "out"],
                [(k, c, lin.in_features, lin.out_features) for k, (c, lin) in kinds.items()]))
    rows = [("float weights", fmt_bytes(model_bytes(m))),
            (f"quantized W{a.bits} g{a.group_size} (estimate)", fmt_bytes(est["output_bytes"]))]
    if not a.allow_pickle:
        rows += [(label_, fmt_bytes(n)) for label_, n in _preflight(m, path, recipe).rows()]
        from frugal.compression.preflight import available_ram_bytes, free_disk_bytes

        rows += [("this machine: available RAM", fmt_bytes(available_ram_bytes())),
                 ("this machine: free disk (here)", fmt_bytes(free_disk_bytes(Path.cwd())))]
    print(table(["memory", "bytes"], rows))
    if misfit:
        print(f"group size {a.group_size} does not divide the input width of {len(misfit)} layers (e.g. {misfit[0]})")
    if a.project:
        _print_projection(cfg, recipe)
    return 0


def _preflight(m, path, recipe):
    """The pre-flight estimate: from the checkpoint's headers, or from the (meta) model's tensors."""
    from frugal.compression.preflight import estimate, estimate_model

    return estimate(path, recipe) if path is not None else estimate_model(m, recipe)


def _print_projection(cfg, recipe) -> None:
    from frugal.compression.projection import project
    from frugal.report.table import table

    p = project(cfg, recipe)
    stages = p.stage_seconds()
    width = "" if p.narrowed == 1 else f" at 1/{p.narrowed} of its width (scaled by the cost of a dense solve)"
    print(f"projected time of {recipe.describe()} on this machine ({p.samples} x {p.seq_len} tokens; one block "
          f"measured{width} on 1 and 3 sequences, x {p.blocks} blocks; loading, saving and the layers outside "
          "the blocks not included):")
    print(table(["stage", "minutes"], [(s, f"{t / 60:.1f}") for s, t in stages.items()]
                + [("total", f"{p.seconds / 60:.1f}")]))
