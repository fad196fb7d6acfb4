"""GGML block grids (the weight types of GGUF files), as llama.cpp dequantizes them.

Every supported type reconstructs a weight as  w_hat = s * q + b  per sub-block, with integer codes q
in [qmin, qmax], a float32 scale s and an optional float32 offset b, both built from the values the
file stores (fp16 super-scales times small integer sub-scales). frugal computes s and b exactly as
the file will hold them, so rounding onto the grid (round-to-nearest or GPTQ) is exact on export.

    type   block  sub  codes        s                  b
    Q8_0     32    32  [-128, 127]  d                  -
    Q4_0     32    32  [-8, 7]      d                  -
    Q5_0     32    32  [-16, 15]    d                  -
    Q4_1     32    32  [0, 15]      d                  m
    Q5_1     32    32  [0, 31]      d                  m
    Q4_K    256    32  [0, 15]      d * sc_j (6-bit)   -dmin * m_j (6-bit)
    Q5_K    256    32  [0, 31]      d * sc_j (6-bit)   -dmin * m_j (6-bit)
    Q6_K    256    16  [-32, 31]    d * sc_j (int8)    -
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from frugal.errors import FrugalError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # weights per stored block
    sub: int  # weights sharing one (s, b)
    qmin: int
    qmax: int
    affine: bool  # has an offset b
    nbytes: int  # bytes per block
    super_scaled: bool = False  # K-quants: sub-scales quantized against per-block d (and dmin)

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.block


TYPES = {t.name: t for t in (
    GGMLType("Q8_0", 32, 32, -128, 127, False, 34),
    GGMLType("Q4_0", 32, 32, -8, 7, False, 18),
    GGMLType("Q5_0", 32, 32, -16, 15, False, 22),
    GGMLType("Q4_1", 32, 32, 0, 15, True, 20),
    GGMLType("Q5_1", 32, 32, 0, 31, True, 24),
    GGMLType("Q4_K", 256, 32, 0, 15, True, 144, True),
    GGMLType("Q5_K", 256, 32, 0, 31, True, 176, True),
    GGMLType("Q6_K", 256, 16, -32, 31, False, 210, True),
)}


def ggml_type(name: str) -> GGMLType:
    if name not in TYPES:
        raise FrugalError(f"GGML type {name}: supported types are {', '.join(TYPES)}")
    return TYPES[name]


@dataclass
class GGMLWeight:
    """An (out, in) weight on a GGML grid: codes, effective scales/offsets, and the stored fields."""

    type: str
    q: torch.Tensor  # (out, in) int8 codes in [qmin, qmax]
    scale: torch.Tensor  # (out, in / sub) float32, s
    offset: torch.Tensor | None  # (out, in / sub) float32, b; None for types without offset
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # what the file stores besides q

    @property
    def bits(self) -> int:
        t = TYPES[self.type]
        return (t.qmax - t.qmin + 1).bit_length() - 1

    @property
    def group_size(self) -> int:
        return TYPES[self.type].sub

    @property
    def zero_point(self) -> None:  # the integer-grid interface: GGML grids have no integer zero point
        return None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s * q + b in float32, in the order llama.cpp's reference (and gguf-py) computes it."""
        sub = TYPES[self.type].sub
        w = self.scale.repeat_interleave(sub, dim=1) * self.q.float()
        if self.offset is not None:
            w = w + self.offset.repeat_interleave(sub, dim=1)
        return w.to(dtype)

    def nbytes(self) -> int:
        t = TYPES[self.type]
        return self.q.numel() // t.block * t.nbytes


def fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back: the value a GGML fp16 field holds."""
    return x.to(torch.float16).float()


def codes_on(w: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, t: GGMLType) -> torch.Tensor:
    """Nearest codes of `w` on the grid s * q + b (all broadcast); s == 0 gives code 0 (or the offset)."""
    x = w if b is None else w - b
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round(x / safe), t.qmin, t.qmax)
    if t.qmin <= 0 <= t.qmax:
        q = torch.where(s == 0, torch.zeros_like(q), q)
    return q


def values_on(q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    v = s * q
    return v if b is None else v + b


def _sub_params(ws: torch.Tensor, t: GGMLType, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float (s, b) per row of `ws` (rows, sub) for a range shrunk by factor p (before field rounding)."""
    if t.affine:
        lo, hi = ws.min(dim=1).values, ws.max(dim=1).values
        if t.super_scaled:  # K-quants store the offset as an unsigned -dmin * m: it must be <= 0
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        lo, hi = lo * p, hi * p
        return (hi - lo).clamp_min(0) / (t.qmax - t.qmin), lo
    # symmetric: the largest-magnitude weight lands on qmin (as llama.cpp does), the rest inside
    idx = ws.abs().argmax(dim=1, keepdim=True)
    ext = torch.gather(ws, 1, idx).squeeze(1) * p
    s = ext / t.qmin if t.name != "Q8_0" else ws.abs().amax(dim=1) * p / t.qmax
    return s, None


def _error(ws, s, b, t, weight) -> torch.Tensor:
    q = codes_on(ws, s[:, None], None if b is None else b[:, None], t)
    e = values_on(q, s[:, None], None if b is None else b[:, None]) - ws
    return (e.pow(2) * weight).sum(dim=1)


def search_sub_params(ws: torch.Tensor, t: GGMLType, weight: torch.Tensor, shrinks: list[float]):
    """(s, b) per sub-block row minimising the importance-weighted squared error over range shrinks.

    For simple types the candidate s (and b) are rounded to fp16 first, so the search sees the stored
    grid; K-quant sub-scales are rounded later against the super-block scale.
    """
    best = best_s = best_b = None
    for p in shrinks:
        s, b = _sub_params(ws, t, p)
        if not t.super_scaled:
            s, b = fp16(s), None if b is None else fp16(b)
        err = _error(ws, s, b, t, weight)
        if best is None:
            best, best_s, best_b = err, s, b
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        if b is not None:
            best_b = torch.where(better, b, best_b)
    return best_s, best_b


def _super_quantize(v: torch.Tensor, levels: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize per-sub-block values v (blocks, n_sub) to integers against one fp16 scale per block."""
    amax = v.abs().amax(dim=1)
    d = fp16(amax / levels)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    lo = -levels if signed else 0
    ints = torch.clamp(torch.round(v / safe[:, None]), lo, levels)
    return d, ints


def make_grid(w: torch.Tensor, type_name: str, importance: torch.Tensor | None = None,
              shrinks: list[float] | None = None) -> GGMLWeight:
    """The grid of type `type_name` for an (out, in) weight, codes by round-to-nearest.

    The range search minimises each sub-block's squared error weighted by |w| + rms(sub-block) (llama.cpp's
    weighting without an importance matrix), times `importance` (in,) when given (e.g. diag of the GPTQ
    Hessian); `shrinks` are the range factors tried (default: 1.0 down to 0.7 in 16 steps).
    """
    t = ggml_type(type_name)
    out_f, in_f = w.shape
    if in_f % t.block:
        raise FrugalError(f"{type_name} needs rows whose length is a multiple of {t.block}; this weight has {in_f}")
    shrinks = shrinks or torch.linspace(1.0, 0.7, 16).tolist()
    w = w.float()
    ws = w.reshape(-1, t.sub)  # (out * in / sub, sub)
    weight = ws.abs() + ws.pow(2).mean(dim=1, keepdim=True).sqrt()  # (rows, sub)
    if importance is not None:
        weight = weight * (importance.float().clamp_min(0) + 1e-12).reshape(-1, t.sub).repeat(out_f, 1)
    s, b = search_sub_params(ws, t, weight, shrinks)
    n_sub = in_f // t.sub
    s, b = s.reshape(out_f, n_sub), None if b is None else b.reshape(out_f, n_sub)
    fields, s, b = _store(t, s, b)
    q = codes_on(w, s.repeat_interleave(t.sub, 1), None if b is None else b.repeat_interleave(t.sub, 1), t)
    return GGMLWeight(type_name, q.to(torch.int8), s, b, fields)


def _store(t: GGMLType, s: torch.Tensor, b: torch.Tensor | None):
    """Fields the file holds for float (s, b) per sub-block, and the exact (s, b) they reconstruct."""
    out_f, n_sub = s.shape
    if not t.super_scaled:
        fields = {"d": s.to(torch.float16)}
        if b is not None:
            fields["m"] = b.to(torch.float16)
        return fields, fp16(s), None if b is None else fp16(b)
    per = t.block // t.sub  # sub-blocks per super-block
    if t.name == "Q6_K":
        d, sc = _super_quantize(s.reshape(-1, per), 127, signed=True)
        s_eff = (d[:, None] * sc).reshape(out_f, n_sub)
        return {"d": d.to(torch.float16).reshape(out_f, -1), "sc": sc.to(torch.int8).reshape(out_f, n_sub)}, s_eff, None
    d, sc = _super_quantize(s.reshape(-1, per), 63, signed=False)
    dmin, mn = _super_quantize((-b).clamp_min(0).reshape(-1, per), 63, signed=False)
    s_eff = (d[:, None] * sc).reshape(out_f, n_sub)
    b_eff = -(dmin[:, None] * mn).reshape(out_f, n_sub)
    fields = {"d": d.to(torch.float16).reshape(out_f, -1), "dmin": dmin.to(torch.float16).reshape(out_f, -1),
              "sc": sc.to(torch.uint8).reshape(out_f, n_sub), "m": mn.to(torch.uint8).reshape(out_f, n_sub)}
    return fields, s_eff, b_eff


# -- packing into the bytes of a GGUF tensor ---------------------------------------------------------

def _nibbles(u: np.ndarray, halves: int, width: int) -> np.ndarray:
    """Pack unsigned 4-bit values (n, halves * 2 * width) as low/high nibbles of (n, halves * width) bytes."""
    import numpy as np

    u = u.reshape(u.shape[0], halves, 2, width)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(u.shape[0], -1).astype(np.uint8)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block (n, 8) into the 12-byte K-quant layout."""
    import numpy as np

    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.reshape(-1, 1).to(torch.float16).numpy().view("uint8")


def pack(gw: GGMLWeight) -> np.ndarray:
    """The GGUF bytes of `gw`: (out, in / block * bytes_per_block) uint8, llama.cpp's block layouts."""
    import numpy as np

    t = TYPES[gw.type]
    out_f, in_f = gw.q.shape
    u = (gw.q.to(torch.int16) - (t.qmin if t.qmin < 0 and t.name != "Q8_0" else 0)).numpy().astype(np.uint8)
    u = u.reshape(-1, t.block)  # (blocks, block) unsigned codes
    f = gw.fields
    if t.name == "Q8_0":
        parts = [_f16_bytes(f["d"]), gw.q.reshape(-1, 32).numpy().view(np.uint8)]
    elif t.name in ("Q4_0", "Q4_1"):
        parts = [_f16_bytes(f["d"])] + ([_f16_bytes(f["m"])] if t.affine else []) + [_nibbles(u, 1, 16)]
    elif t.name in ("Q5_0", "Q5_1"):
        qh = np.packbits((u >> 4).astype(np.uint8), axis=1, bitorder="little")  # (blocks, 4): bit i = element i
        parts = [_f16_bytes(f["d"])] + ([_f16_bytes(f["m"])] if t.affine else []) + [qh, _nibbles(u & 0x0F, 1, 16)]
    elif t.name in ("Q4_K", "Q5_K"):
        scales = _k_scales(f["sc"].numpy().reshape(-1, 8), f["m"].numpy().reshape(-1, 8))
        parts = [_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), scales]
        if t.name == "Q5_K":
            hi = (u >> 4).reshape(-1, 8, 32).astype(np.uint8)  # bit k of byte j: element 32k + j
            parts.append(sum(hi[:, k] << k for k in range(8)).astype(np.uint8))
        parts.append(_nibbles(u & 0x0F, 4, 32))
    elif t.name == "Q6_K":
        ql = _nibbles((u & 0x0F), 2, 64)
        hi = (u >> 4).reshape(-1, 2, 4, 32)
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
        parts = [ql, qh.astype(np.uint8), f["sc"].numpy().reshape(-1, 16).view(np.uint8), _f16_bytes(f["d"])]
    else:  # pragma: no cover - TYPES and this function list the same types
        raise FrugalError(f"no packer for {gw.type}")
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == t.nbytes, (gw.type, blocks.shape)
    return np.ascontiguousarray(blocks.reshape(out_f, -1))
