"""Streaming compression: models larger than RAM, one decoder block in memory at a time.

The model is built from its config with parameters on the meta device (buffers such as rotary
frequencies are real). The pieces outside the blocks (embeddings, final norm, head) are read from the
safetensors files; each block is read, quantized with `engine.quantize_block` (the in-memory path's own
step), written as its own safetensors shard and put back on meta. What every block receives (masks and
rotary embeddings differ per block) comes from one forward of the skeleton in which each block is a
recorder that passes its input through, so no block has to be in memory to learn it.

Everything is written in a work directory beside the output, with a durable checkpoint after each
block (manifest.json: the finished shards and their sha256, the file holding the next block's inputs,
a fingerprint of source, recipe and calibration). Running the same command again continues after the
last finished block, and the output is byte-identical to an uninterrupted run. The output directory
appears by one rename at the end. Calibration activations stay in RAM, or, when two sets do not fit
the activation budget, each block reads its inputs from a file on disk one sample at a time and only
its outputs are held (same output either way).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from frugal.atomic import check_output_dir, publish_modes, replace_dir
from frugal.calibrate import for_recipe
from frugal.compression import methods, timing, transforms
from frugal.compression.transforms import Place
from frugal.compression.engine import quantize_block, quantize_outside
from frugal.compression.hooks import Stop, recording_calls, split_hidden
from frugal.compression.plan import check_plan, fit_groups
from frugal.compression.preflight import available_ram_bytes, estimate, read_header
from frugal.compression.result import CompressionReport, layer_reports
from frugal.compression.workdir import (MANIFEST, SlotFile, SlotWriter, fingerprint, fsync_dir, locked, open_work,
                                        save_shard, write_json, write_slots)
from frugal.config import as_recipe
from frugal.errors import FrugalError
from frugal.exporters.compressed_tensors import (checkpoint_linears, compressed_state_dict, dequantize_route,
                                                 one_scheme_each, quantization_config)
from frugal.exporters.hf import dedupe_tied, write_metadata
from frugal.load.blocks import find_blocks, outside_linears
from frugal.load.model import load_tokenizer
from frugal.load.lazy import Source, build_skeleton, fixed_mmap_threshold, load_outside, materialise, release

log = logging.getLogger(__name__)

Progress = Callable[[str, int], None]  # (event, block): "block-start", "shard", "checkpoint", "outside", "finish"


# -- block inputs without running the blocks ------------------------------------------------------
@contextlib.contextmanager
def _forwards(blocks: nn.ModuleList, make: Callable[[int], Callable]) -> Iterator[None]:
    """Replace each block's forward by make(i) while the context lasts."""
    for i, b in enumerate(blocks):
        b.forward = make(i)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


@torch.no_grad()
def record_calls(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor,
                 sink: Callable[[torch.Tensor], None] | None) -> tuple[tuple, list[dict]]:
    """(positional args after the hidden states, keyword arguments per block) from a forward of the
    first sample in which every block only records its call and passes its input through; with a
    `sink`, block 0's input of every sample, in order, goes to it. No block computes anything."""

    state = {"all": True}

    def make(i: int):
        def forward(*args, **kwargs):
            hidden = split_hidden(args, kwargs)[0]
            if i == 0 and sink is not None:
                sink(hidden.detach().clone())  # (1, seq, hidden)
            if i == len(blocks) - 1 or not state["all"]:
                raise Stop
            return hidden
        return forward

    def run(j: int) -> None:
        try:
            model(samples[j : j + 1], use_cache=False)
        except Stop:
            pass

    with _forwards(blocks, make):
        with recording_calls(blocks) as calls:  # the first sample: every block's call
            run(0)
        state["all"] = False
        for j in range(1, samples.shape[0] if sink is not None else 1):
            run(j)
    return calls[0][1], [c[2] if c else {} for c in calls]


def _replay(blocks: nn.ModuleList, outputs: Sequence[torch.Tensor], returns_tuple: bool):
    """Forwards that skip every block, the last one returning the saved outputs, batch by batch: the
    model's forward then runs only the pieces outside the blocks, on the quantized blocks' outputs."""
    count = [0]

    def make(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == len(blocks) - 1:  # a batched call (B, seq, hidden) gets the next B saved outputs
                n = hidden.shape[0]
                hidden = torch.cat([outputs[j] for j in range(count[0], count[0] + n)])
                count[0] += n
            return (hidden,) if returns_tuple else hidden
        return forward

    return _forwards(blocks, make)


class _Collect:
    """Block inputs as they are recorded: kept in a list, or written to a slot file on disk."""

    def __init__(self, path: Path, n: int, in_ram: bool):
        self.path, self.n, self.in_ram = path, n, in_ram
        self.items: list[torch.Tensor] = []
        self.writer: SlotWriter | None = None

    def __call__(self, t: torch.Tensor) -> None:
        if self.in_ram:
            self.items.append(t)
            return
        if self.writer is None:
            self.writer = SlotWriter(self.path, self.n, t.shape, t.dtype)
        self.writer.write(self.writer.next, t)

    def result(self) -> Sequence[torch.Tensor]:
        if self.in_ram:
            return self.items
        self.writer.close()
        return SlotFile(self.path)


# -- one block ------------------------------------------------------------------------------------
def block_tensors(model: nn.Module, prefix: str, quantized: dict, dtype: Any = None) -> dict[str, torch.Tensor]:
    """Block `prefix`'s output tensors by full name, quantized weights packed as compressed-tensors (MoE
    experts under the checkpoint's names), float tensors in `dtype` (None: as they are)."""

    return compressed_state_dict(model, quantized, dtype, under=prefix)


# -- the job ------------------------------------------------------------------------------------------
def _acts_name(i: int) -> str:
    return f"acts-{i:05d}.safetensors"  # the inputs of block i


@dataclass
class _Job:
    src: Source
    model: nn.Module
    blocks_name: str
    blocks: nn.ModuleList
    recipe: Any
    work: Path
    manifest: dict
    in_ram: bool
    progress: Progress = field(default=lambda event, block: None)

    @property
    def shard_dir(self) -> Path:
        return self.work / "out"

    def shard_name(self, i: int) -> str:
        """Block i is shard i+1; the pieces outside the blocks are the last shard."""
        n = len(self.blocks) + 1
        return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _run_block(job: _Job, i: int, inputs: Sequence[torch.Tensor] | None, args: tuple, kw: dict):
    """Read, quantize, write and release block i, then checkpoint; its outputs (the next block's inputs)."""

    block, prefix = job.blocks[i], f"{job.blocks_name}.{i}"
    materialise(block, prefix, job.src, model=job.model)
    job.progress("block-start", i)
    acts = job.work / _acts_name(i + 1)

    def note_kind(_mod, _args, output):  # what a block returns decides what the replay returns
        job.manifest["returns_tuple"] = isinstance(output, tuple)

    hook = block.register_forward_hook(note_kind)
    q, reports, out = quantize_block(block, prefix, job.recipe, inputs, args, kw, {})  # inputs None: no calibration
    hook.remove()
    if out is not None:
        write_slots(acts, out)
        if not job.in_ram:
            out = SlotFile(acts)  # the list goes; the next block reads its inputs from disk one at a time
    sha = save_shard(block_tensors(job.model, prefix, q, job.recipe.cast_dtype()), job.shard_dir / job.shard_name(i))
    release(block)
    del q
    job.progress("shard", i)
    _checkpoint(job, i, sha, reports, acts if out is not None else None)
    job.progress("checkpoint", i)
    return out


def _checkpoint(job: _Job, i: int, shard_sha: str, reports: dict, acts: Path | None) -> None:
    """Record block i as finished (atomically), then drop the inputs it no longer needs."""
    m = job.manifest
    m["shards"][job.shard_name(i)] = shard_sha
    m["layers"] += [[name, r.to_dict()] for name, r in reports.items()]
    m["inputs"] = acts.name if acts is not None else None
    m["next_block"] = i + 1
    write_json(job.work / MANIFEST, m)
    (job.work / _acts_name(i)).unlink(missing_ok=True)


def _block_inputs(job: _Job, samples: torch.Tensor) -> tuple[Sequence[torch.Tensor], tuple, list[dict]]:
    """Inputs of the next block to run (recorded, or from the checkpoint) and every block's call arguments."""
    k = job.manifest["next_block"]
    collect = _Collect(job.work / _acts_name(0), samples.shape[0], job.in_ram) if k == 0 else None
    args, calls = record_calls(job.model, job.blocks, samples, collect)
    if collect is not None:
        return collect.result(), args, calls
    saved = SlotFile(job.work / job.manifest["inputs"])
    return (list(saved) if job.in_ram else saved), args, calls


def _run_blocks(job: _Job, samples: torch.Tensor | None) -> Sequence[torch.Tensor] | None:
    """Every block not finished yet, in order; the last block's outputs (None without calibration)."""
    from tqdm.auto import tqdm

    k, n = job.manifest["next_block"], len(job.blocks)
    inputs, args, calls = None, (), [{} for _ in range(n)]
    if samples is not None:
        inputs, args, calls = _block_inputs(job, samples)
    if k:
        log.info("resuming at block %d of %d from %s", k, n, job.work)
    for i in tqdm(range(k, n), initial=k, total=n, desc=f"{job.recipe.method} (streaming)", unit="block"):
        inputs = _run_block(job, i, inputs, args, calls[i])
    return inputs


# -- the end: pieces outside the blocks, metadata, delivery --------------------------------------
@dataclass
class _Scheme:
    """What `quantization_config` reads of a QuantizedWeight (kept instead of the codes)."""

    bits: int
    group_size: int
    zero_point: Any  # None for symmetric grids


def _quantize_outside(job: _Job, samples: torch.Tensor | None, outputs: Sequence[torch.Tensor] | None):
    """Linear layers outside the blocks (engine.quantize_outside, fed by replaying the last block's outputs)."""

    quantized, reports = {}, {}
    layers = outside_linears(job.model, job.blocks_name, job.recipe.ignore)
    if layers:
        job.progress("outside", len(job.blocks))
        replay = contextlib.nullcontext()
        if methods.get(job.recipe.method).needs_hessian:
            replay = _replay(job.blocks, outputs, bool(job.manifest["returns_tuple"]))
        with replay:
            quantize_outside(job.model, layers, job.recipe, samples, quantized, reports, {})
    return quantized, reports


def _write_index(directory: Path) -> None:
    """model.safetensors.index.json from the shards' headers."""
    weight_map, total = {}, 0
    for shard in sorted(directory.glob("model-*.safetensors")):
        header, _ = read_header(shard)
        for name, h in header.items():
            weight_map[name] = shard.name
            total += h["data_offsets"][1] - h["data_offsets"][0]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_metadata(model: nn.Module, tokenizer: Any, directory: Path, qc: dict, dtype: Any) -> None:
    """config.json (with quantization_config), generation config and tokenizer, as export.hf writes them."""

    write_metadata(model, tokenizer, directory, qc, dtype)


def _finish(job: _Job, samples, outputs, tokenizer, report_args: tuple) -> None:
    """Outside layers, the last shard, index, config, tokenizer and frugal.json, all in the work directory."""

    quantized, outside_reports = _quantize_outside(job, samples, outputs)
    sd = compressed_state_dict(job.model, quantized, job.recipe.cast_dtype(), skip=job.blocks_name)
    save_shard(dedupe_tied(sd), job.shard_dir / job.shard_name(len(job.blocks)))
    _write_index(job.shard_dir)
    reports = {**layer_reports(dict(job.manifest["layers"])), **outside_reports}
    schemes = {n: _Scheme(r.bits, r.group_size, None if r.symmetric else True) for n, r in reports.items()}
    dense_route = dequantize_route(job.model, schemes)
    linears, named = checkpoint_linears(job.model, schemes)  # MoE experts: the checkpoint's names
    qc = quantization_config(named, linears, dense_first=dense_route)
    if dense_route:
        qc["dequantize"] = True
        if len(one_scheme_each(job.model, schemes)) < len(schemes):  # the shards are written: say so
            log.warning("plain transformers cannot load this streamed output (its dequantize-at-load route reads one "
                        "scheme per kind of layer; this one has more): load it with frugal.load_model, or compress "
                        "in memory, which writes such layers dequantized")
    _write_metadata(job.model, tokenizer, job.shard_dir, qc, job.recipe.cast_dtype())
    report = CompressionReport(job.recipe, *report_args, layers=reports)
    (job.shard_dir / "frugal.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    job.progress("finish", len(job.blocks))


def _deliver(built: Path, out: Path, overwrite: bool) -> None:
    """Move the finished directory to `out` in one rename (an existing `out` only with `overwrite`)."""

    if out.exists() and not overwrite:
        raise FrugalError(f"{out}: output already exists (pass --overwrite to replace it)")
    publish_modes(built)
    replace_dir(built, out)
    fsync_dir(out.parent)


# -- entry points -----------------------------------------------------------------------------------
def _check_job(recipe: Any, calibration: Any) -> None:
    """Refuse what streaming cannot do, before any work."""
    if recipe.gguf_type:
        raise FrugalError(f"recipe.gguf_type={recipe.gguf_type}: streaming writes compressed-tensors; GGUF targets "
                          "need the in-memory path")
    for t in transforms.enabled(recipe):
        if t.streaming:
            raise FrugalError(f"recipe.{t.name}: {t.streaming}")
    if calibration is False or calibration == "data-free":
        raise FrugalError("--data-free: streaming cannot generate calibration text (the model is never whole in "
                          "memory); pass --calib FILE")


def _activations_in_ram(directory: Path, recipe: Any, samples: torch.Tensor | None, budget: int | None) -> bool:
    """Keep calibration activations in RAM? Two sets (a block's inputs and outputs) must fit `budget`
    (bytes); without a budget, the whole streaming job must fit the RAM available now. Otherwise the
    inputs are read from disk and only the outputs are held."""

    if samples is None:
        return True
    est = estimate(directory, recipe, samples.shape[0], samples.shape[1])
    fits = est.peak_ram_bytes <= available_ram_bytes() if budget is None else 2 * est.activation_bytes <= budget
    if not fits:
        log.info("calibration activations (2 x %.2f GB) kept on disk", est.activation_bytes / 1e9)
    return fits


def compress_streaming(model: Any = None, recipe: Any = None, out: str | Path = "out/stream", calibration: Any = None,
                       *, overwrite: bool = False, resume: bool = True, activation_budget: int | None = None,
                       progress: Progress | None = None) -> Path:
    """Compress `model` (directory, .gguf file or None for the default) into a compressed-tensors directory
    `out`, one decoder block in memory at a time; the same quantized tensors and frugal.json as
    `frugal.compress(...).save(out)`. An interrupted run with the same arguments continues (`resume`)."""

    recipe = as_recipe(recipe)
    _check_job(recipe, calibration)
    fixed_mmap_threshold()
    directory, source = model_directory(model)
    out = check_output_dir(out, overwrite, sources=(source, directory))
    src = Source(directory)
    skeleton = build_skeleton(directory)
    blocks_name, blocks = find_blocks(skeleton)
    recipe = fit_groups(skeleton, recipe)
    check_plan(skeleton, recipe, ("compressed-tensors",), calibration)
    tokenizer = load_tokenizer(directory)
    torch.manual_seed(recipe.seed)
    samples, calib_info = for_recipe(calibration, tokenizer, None, recipe)
    in_ram = _activations_in_ram(directory, recipe, samples, activation_budget)
    work = out.parent / f".{out.name}.stream-work"
    with locked(work), timing.collect() as stages:  # another process's work directory is refused, untouched
        manifest = open_work(work, fingerprint(src, recipe, samples), len(blocks), resume)
        job = _Job(src, skeleton, blocks_name, blocks, recipe, work, manifest, in_ram, progress or (lambda e, b: None))
        with _cleaned_up(job, out):
            load_outside(skeleton, blocks_name, src)
            for name, step in transforms.named_steps_at(recipe, Place.MODEL):  # those streaming runs (on what is loaded)
                with timing.stage(name):
                    step(skeleton, recipe)
            outputs = _run_blocks(job, samples)
            with timing.stage("outside layers and save"):
                _finish(job, samples, outputs, tokenizer, (str(source), calib_info))
                _deliver(job.shard_dir, out, overwrite)
    log.info("compression stages (this run): %s", timing.describe(stages))
    shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s", out)
    return out


@contextlib.contextmanager
def _cleaned_up(job: _Job, out: Path) -> Iterator[None]:
    """A FrugalError (bad input, a lost race for `out`: resuming cannot help) removes the work directory;
    a failed write (full disk, quota) keeps it, with one line saying what failed and what is kept for a
    resume; an interruption keeps it silently (the same command continues)."""
    from frugal.atomic import os_error_code

    try:
        yield
    except FrugalError as e:
        shutil.rmtree(job.work, ignore_errors=True)
        raise FrugalError(f"{e} (nothing written to {out}; work directory removed)") from None
    except Exception as e:
        code = os_error_code(e)
        if code is None:
            raise
        done = len(job.manifest.get("shards", {}))
        kept = sum(f.stat().st_size for f in job.work.rglob("*") if f.is_file())
        raise FrugalError(f"{out}: {os.strerror(code)} writing {getattr(e, 'filename', None) or job.work}; "
                          f"{job.work} keeps {done} of {len(job.blocks)} finished blocks ({kept / 1e6:.1f} MB): "
                          f"free space and run the same command to resume, or delete it") from None


def model_directory(spec: Any, warn: bool = True) -> tuple[Path, Path]:
    """(directory with config.json + safetensors, what the user named); a GGUF file is dequantized once
    (`warn`: say so, as streaming does; pre-flight only reads the copy's sizes)."""
    from frugal.load.model import model_directory as checked_directory
    from frugal.load.model import resolve

    source = resolve(spec)
    if source.is_file():
        if source.suffix != ".gguf":
            raise FrugalError(f"{source}: streaming needs a model directory (safetensors) or a .gguf file")
        if warn:
            log.warning("%s: a GGUF file is dequantized whole, once (cached); streaming starts from that copy", source)
    return checked_directory(source)[1], source
