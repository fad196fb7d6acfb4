"""`frugal info`: architecture, parameters, layers that would be quantized, memory estimate."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_info(a: argparse.Namespace) -> int:
    from frugal.load.blocks import find_blocks, quantizable_linears
    from frugal.config import WeightScheme
    from frugal.load.model import load_model
    from frugal.report.table import fmt_bytes, table
    from frugal.evaluation.sizes import compression_estimate, model_bytes

    loaded = load_model(a.model, allow_pickle=a.allow_pickle)
    m = loaded.model
    scheme = WeightScheme(a.bits, a.group_size)
    scheme.validate("info")
    blocks_name, blocks = find_blocks(m)
    layers = quantizable_linears(m, ("lm_head",))
    n_params = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    est = compression_estimate(m, layers, scheme, a.samples, a.calib_len)
    misfit = [n for n, l in layers.items() if a.group_size != -1 and l.in_features % a.group_size]
    kinds: dict[str, list] = {}  # layer kind -> [count, first layer of that kind]
    for n, lin in layers.items():
        key = n[len(blocks_name) + 1:].split(".", 1)[1] if n.startswith(blocks_name + ".") else n
        kinds.setdefault(key, [0, lin])[0] += 1
    print(f"{loaded.source}: {m.config.model_type} ({type(m).__name__}), {n_params / 1e6:.1f} M parameters, "
          f"{len(blocks)} blocks at '{blocks_name}'")
    print(table(["layer (per block)", "count", "in", "out"],
                [(k, c, lin.in_features, lin.out_features) for k, (c, lin) in kinds.items()]))
    rows = [("float weights", fmt_bytes(model_bytes(m))),
            (f"quantized W{a.bits} g{a.group_size} (estimate)", fmt_bytes(est["output_bytes"]))]
    if not a.allow_pickle:
        from frugal.config import Recipe
        from frugal.compression.preflight import available_ram_bytes, estimate, free_disk_bytes

        pre = estimate(loaded.path, Recipe(weights=scheme), a.samples, a.calib_len)
        rows += [(label, fmt_bytes(n)) for label, n in pre.rows()]
        rows += [("this machine: available RAM", fmt_bytes(available_ram_bytes())),
                 ("this machine: free disk (here)", fmt_bytes(free_disk_bytes(Path.cwd())))]
    print(table(["memory", "bytes"], rows))
    if misfit:
        print(f"group size {a.group_size} does not divide the input width of {len(misfit)} layers (e.g. {misfit[0]})")
    return 0
