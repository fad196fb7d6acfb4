"""Projected time of a compression, from one block measured on this machine.

A model's compression time is its blocks' time: every block of a decoder has the same shapes. So
`project` builds the model's first block (a one-block copy of the configuration, random weights, a small
vocabulary), runs the real engine on it twice, on 1 and on 3 calibration sequences, fits each stage's
time as fixed + per sequence (the solve is fixed, the passes over the data per sequence), and scales to
the model's samples and blocks. A block whose compression would not fit in half the free memory is
measured at 1/2, 1/4, ... of its width and scaled by k^3 (fixed: a dense solve) and k^2 (per sequence).
What it leaves out: the layers outside the blocks (the head; `ignore`d by default), loading and saving,
and the speed-up that larger batches give on some CPUs (the measured batches are 1 and 3 sequences).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from frugal.errors import FrugalError

log = logging.getLogger(__name__)

MEASURED = (1, 3)  # calibration sequences of the two measurements (fixed cost + cost per sequence)
SMALL_VOCAB = 256  # the measured copy's vocabulary: the embedding and head are not projected
WIDTH_ATTRS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "moe_intermediate_size")


@dataclass
class Projection:
    """Seconds per stage of a whole model: per block, fixed + per_sequence x samples (fitted from two
    measurements of one block), times the blocks; `narrowed`: the block was measured at 1/narrowed of
    its width and scaled (x narrowed^3 the fixed part, a dense solve; x narrowed^2 per sequence)."""

    blocks: int
    samples: int
    seq_len: int
    fixed: dict[str, float] = field(default_factory=dict)  # stage -> seconds of one block
    per_sequence: dict[str, float] = field(default_factory=dict)
    narrowed: int = 1

    def stage_seconds(self) -> dict[str, float]:
        k = self.narrowed
        return {s: self.blocks * (self.fixed[s] * k ** 3 + self.per_sequence[s] * k ** 2 * self.samples)
                for s in self.fixed}

    @property
    def seconds(self) -> float:
        return sum(self.stage_seconds().values())


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def one_block_model(config, vocab: int = SMALL_VOCAB, narrow: int = 1):
    """A float32 causal LM of `config` with one decoder block, a `vocab`-token vocabulary, and its widths
    divided by `narrow` (head size kept), random weights (seed 0)."""
    import copy

    import torch
    import transformers

    cfg = copy.deepcopy(config)
    tc = text_config(cfg)
    if narrow > 1:
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        for attr in WIDTH_ATTRS:
            if isinstance(getattr(tc, attr, None), int):
                setattr(tc, attr, max(1, getattr(tc, attr) // narrow))
        tc.head_dim = head_dim
    tc.num_hidden_layers, tc.vocab_size = 1, vocab
    if isinstance(getattr(tc, "layer_types", None), list):  # per-layer lists must match the one layer
        tc.layer_types = tc.layer_types[:1]
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(tc, attr, None), int) and getattr(tc, attr) >= vocab:
            setattr(tc, attr, 0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()


def narrowing(config, recipe, available: int) -> int:
    """The smallest power of two dividing the block's widths so that compressing one block needs at most
    half of `available` bytes (pre-flight estimate of the one-block model)."""
    from frugal.compression.preflight import estimate_model

    for k in (1, 2, 4, 8, 16):
        if estimate_model(meta_model(config, narrow=k), recipe, max(MEASURED)).in_memory_ram_bytes <= available // 2:
            return k
    raise FrugalError(f"one block of {getattr(config, 'model_type', 'this model')} does not fit in half of the "
                      f"available memory even at 1/16 of its width")


def _measure(config, recipe, n: int, narrow: int) -> dict[str, float]:
    """Stage seconds of compressing the one-block model on `n` random calibration sequences."""
    import torch

    from frugal.compression.engine import compress_model
    from frugal.compression.timing import collect

    model = one_block_model(config, narrow=narrow)
    small = replace(recipe, calibration=replace(recipe.calibration, num_samples=n,
                                                batch_size=min(n, recipe.calibration.batch_size)))
    ids = torch.randint(0, SMALL_VOCAB, (n, recipe.calibration.seq_len), generator=torch.Generator().manual_seed(0))
    with collect() as times:
        compress_model(model, small, ids if recipe.needs_calibration else None)
    times.pop("outside layers", None)
    return dict(times)


def _fastest(times: list[dict[str, float]]) -> dict[str, float]:
    """Per stage, the fastest of repeated measurements (noise on a shared machine only adds time)."""
    return {s: min(t.get(s, float("inf")) for t in times) for s in times[0]}


def project(config, recipe, samples: int | None = None, available: int | None = None) -> Projection:
    """Projected stage times of compressing a model of `config` (a transformers config) with `recipe`:
    one block measured on MEASURED[0] and MEASURED[1] sequences (alternated, twice; the fastest of each),
    a line through the two per stage."""
    from frugal.compression.preflight import available_ram_bytes

    samples = samples or recipe.calibration.num_samples
    k = narrowing(config, recipe, available or available_ram_bytes())
    n_blocks = int(text_config(config).num_hidden_layers)
    log.info("measuring one block of %d%s on %s sequences", n_blocks,
             "" if k == 1 else f" at 1/{k} of its width", " and ".join(map(str, MEASURED)))
    runs = [(n, _measure(config, recipe, n, k)) for n in (*MEASURED, *MEASURED)]  # alternated, twice: the
    (n1, t1), (n2, t2) = ((n, _fastest([t for m, t in runs if m == n])) for n in MEASURED)  # fastest of each
    p = Projection(n_blocks, samples if recipe.needs_calibration else 0, recipe.calibration.seq_len, narrowed=k)
    for s in t2:
        slope = max(0.0, (t2[s] - t1.get(s, 0.0)) / (n2 - n1)) if recipe.needs_calibration else 0.0
        p.per_sequence[s] = slope
        p.fixed[s] = max(0.0, t2[s] - slope * n2)
    return p


def load_config(spec: str | Path):
    """A transformers config from a JSON file or a directory holding config.json (weights not needed)."""
    import json

    import transformers

    path = Path(spec)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FrugalError(f"{spec}: no config.json to read")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise FrugalError(f"{path}: not a configuration transformers knows ({str(e).splitlines()[0][:160]})") from None


def meta_model(config, narrow: int | None = None):
    """The model of `config` on the meta device (its shapes without memory); with `narrow`, the one-block
    model one_block_model would measure."""
    import torch
    import transformers

    with torch.device("meta"):
        if narrow is not None:
            return one_block_model(config, narrow=narrow)
        return transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
