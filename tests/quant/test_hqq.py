"""HQQ (half-quadratic, calibration-free): exportable grids, never worse than RTN per group, SQNR
gains over RTN on heavy-tailed and real weights, RTN with MSE clip search as the stronger baseline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from frugal.config import ClipSearch, WeightScheme
from frugal.errors import FrugalError
from frugal.load.model import cache_dir
from frugal.quant.grid import QuantizedWeight, qrange, quantize_codes
from frugal.quant.hqq import HQQOptions, _fit_scale_zero, half_quadratic, hqq_quantize
from frugal.quant.rtn import rtn_quantize

OUT, IN = 256, 512
# Mean SQNR gain of HQQ over RTN (dB) at group 64, float16 scales, on `heavy_tailed` weights.
# Measured on seeds 0-2: asym 1.37 / 0.65 / 0.23, sym 1.79 / 1.01 / 0.46 at 2 / 3 / 4 bits.
# symmetric: against RTN's signed-extreme grid (measured +0.97 / +0.64 / +0.27 dB at 2 / 3 / 4 bits; that grid
# is itself +1.88 / +1.20 / +0.76 dB over the max|w| / 7.5 grid HQQ was first measured against)
MIN_GAIN = {(2, False): 1.0, (3, False): 0.45, (4, False): 0.15, (2, True): 0.8, (3, True): 0.5, (4, True): 0.2}
# The user's cache, read before the test session points FRUGAL_CACHE at a private folder.
USER_CACHE = cache_dir()


def heavy_tailed(seed: int = 0, out: int = OUT, inp: int = IN) -> torch.Tensor:
    """Seeded Student-t(3) weights of scale 0.02 with 0.2% outliers blown up 8x: (out, in)."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(out, inp, 3, generator=g).pow(2).sum(-1) / 3
    w = 0.02 * torch.randn(out, inp, generator=g) / chi2.sqrt()
    idx = torch.randint(0, out * inp, (out * inp // 500,), generator=g)
    w.view(-1)[idx] *= 8
    return w


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return 10 * math.log10(w.pow(2).sum().item() / (w - w_hat).pow(2).sum().item())


def group_sq_err(w: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Squared reconstruction error per (row, group)."""
    gs = w.shape[1] if qw.group_size == -1 else qw.group_size
    return (w - qw.dequantize()).pow(2).reshape(w.shape[0], -1, gs).sum(-1)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exportable_grid(bits, group_size, symmetric):
    """Int8 codes in range, integer zero points in range (None when symmetric), float16 scales, codes
    that are round-to-nearest on the stored grid, and dequantize = (q - z)·s."""
    w = heavy_tailed(1, 64, 256)
    qw = hqq_quantize(w, WeightScheme(bits, group_size, symmetric), torch.float16)
    qmin, qmax = qrange(bits)
    gs = 256 if group_size == -1 else group_size
    assert qw.q.dtype == torch.int8 and qw.scale.dtype == torch.float16 and qw.scale.shape == (64, 256 // gs)
    assert int(qw.q.min()) >= qmin and int(qw.q.max()) <= qmax
    assert bool((qw.scale != 0).all())  # signed symmetric grids may hold negative scales
    if symmetric:
        assert qw.zero_point is None
        z = torch.zeros(64, 256)
    else:
        assert qw.zero_point.dtype == torch.int8
        assert int(qw.zero_point.min()) >= qmin and int(qw.zero_point.max()) <= qmax
        z = qw.zero_point.float().repeat_interleave(gs, 1)
    s = qw.scale.float().repeat_interleave(gs, 1)
    assert torch.equal(qw.q.float(), quantize_codes(w, s, z, bits))
    assert torch.equal(qw.dequantize(), (qw.q.float() - z) * s)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_better_than_rtn(bits, symmetric, scale_dtype):
    """Every group's squared error is at most RTN's (by construction) and the mean SQNR gain at group
    64 exceeds the stated margin."""
    scheme = WeightScheme(bits, 64, symmetric)
    gains = []
    for seed in (0, 1):
        w = heavy_tailed(seed)
        rtn, hqq = rtn_quantize(w, scheme, scale_dtype=scale_dtype), hqq_quantize(w, scheme, scale_dtype)
        assert bool((group_sq_err(w, hqq) <= group_sq_err(w, rtn)).all())
        gains.append(sqnr_db(w, hqq.dequantize()) - sqnr_db(w, rtn.dequantize()))
    assert sum(gains) / 2 >= MIN_GAIN[bits, symmetric], gains


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_against_mse_clip_search(bits, symmetric):
    """Against RTN with the MSE clip search, HQQ wins at 2 bits (measured +0.29 asym / +0.14 sym dB, the
    symmetric one on the signed-extreme grid) and stays within 0.25 dB at 3 and 4 bits, where clip search
    mostly wins (measured -0.12 .. +0.05)."""
    w = heavy_tailed(0)
    scheme = WeightScheme(bits, 64, symmetric)
    clip = sqnr_db(w, rtn_quantize(w, scheme, ClipSearch(enabled=True), torch.float16).dequantize())
    hqq = sqnr_db(w, hqq_quantize(w, scheme, torch.float16).dequantize())
    assert hqq - clip >= ((0.1 if symmetric else 0.15) if bits == 2 else -0.25), (hqq, clip)


def test_solver_lowers_lp_error():
    """The half-quadratic solver (float zero) lowers every group's l_p error below its starting
    min-max grid, and the mean l_p error by a clear margin (measured 8.8%)."""
    wg = heavy_tailed(2).reshape(-1, 64)
    qmin, qmax = qrange(3)
    s0 = ((wg.max(1, keepdim=True).values - wg.min(1, keepdim=True).values) / (qmax - qmin)).half().float()
    z0 = qmin - wg.min(1, keepdim=True).values / s0

    def lp(s, z):
        q = torch.clamp(torch.round(wg / s + z), qmin, qmax)
        return (wg - (q - z) * s).abs().pow(0.7).sum(1)

    s, z = half_quadratic(wg, s0, z0, 3, _fit_scale_zero(torch.float16), HQQOptions())
    before, after = lp(s0, z0), lp(s, z)
    assert bool((after <= before).all())
    assert after.mean() <= 0.95 * before.mean(), (after.mean() / before.mean()).item()


def test_deterministic_bytes():
    """Two runs give the same codes, scales and zero points, byte for byte."""
    w = heavy_tailed(3)
    a, b = (hqq_quantize(w, WeightScheme(3, 64, False), torch.float16) for _ in range(2))
    for x, y in ((a.q, b.q), (a.scale, b.scale), (a.zero_point, b.zero_point)):
        assert x.numpy().tobytes() == y.numpy().tobytes()


def test_degenerate_groups():
    """All-zero and constant groups reconstruct exactly; a tiny range does not underflow the scale."""
    w = heavy_tailed(4, 4, 128)
    w[0] = 0.0
    w[1, :64] = 0.5
    w[2, 64:] = 1e-9
    for symmetric in (False, True):
        qw = hqq_quantize(w, WeightScheme(4, 64, symmetric), torch.float16)
        w_hat = qw.dequantize()
        assert torch.equal(w_hat[0], w[0]) and torch.isfinite(w_hat).all() and bool((qw.scale != 0).all())
        assert (w_hat[1, :64] - 0.5).abs().max() <= 0.5 / 7  # at most a half step of a [0, 0.5] grid


def test_bad_options():
    """Out-of-range solver options and a group size that does not divide the width name the option."""
    w = heavy_tailed(0, 8, 96)
    with pytest.raises(FrugalError, match="group size 64"):
        hqq_quantize(w, WeightScheme(4, 64, False))
    with pytest.raises(FrugalError, match="lp_norm"):
        hqq_quantize(w, WeightScheme(4, 32, False), lp_norm=1.5)
    with pytest.raises(FrugalError, match="kappa"):
        hqq_quantize(w, WeightScheme(4, 32, False), kappa=0.5)


def _default_model_weights() -> Path | None:
    """The float32 copy of the default model in the user's frugal cache, if it was made already."""
    import hashlib

    from frugal.load.model import default_model_path

    try:
        gguf = default_model_path()
    except FrugalError:
        return None
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()[:20]
    path = USER_CACHE / "gguf" / digest / "model.safetensors"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def real_layers() -> dict[str, torch.Tensor]:
    """q_proj and down_proj of blocks 0 and 29 of the default model (SmolLM2-135M)."""
    path = _default_model_weights()
    if path is None:
        pytest.skip("default model not yet converted in the user's frugal cache (run `frugal info` once)")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {f"{i}.{n}": f.get_tensor(f"model.layers.{i}.{n}.weight")
                for i in (0, 29) for n in ("self_attn.q_proj", "mlp.down_proj")}


# SQNR gain over RTN on those layers together (dB), measured: asym 2.15 / 0.69 / 0.58, sym 1.00 / 0.60 / 0.41
# at 2 / 3 / 4 bits (sym: against RTN's signed-extreme grid; 2.51 / 0.98 / 0.55 against the max|w| / 7.5 one).
REAL_MIN_GAIN = {(2, False): 1.5, (3, False): 0.4, (4, False): 0.3, (2, True): 0.8, (3, True): 0.4, (4, True): 0.3}


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_real_layers(real_layers, bits, symmetric):
    """On real weights HQQ beats RTN in every group and overall by a margin."""
    scheme = WeightScheme(bits, 64, symmetric)
    den_rtn = den_hqq = 0.0
    for name, w in real_layers.items():
        rtn, hqq = rtn_quantize(w, scheme, scale_dtype=torch.float16), hqq_quantize(w, scheme, torch.float16)
        e_rtn, e_hqq = group_sq_err(w, rtn), group_sq_err(w, hqq)
        assert bool((e_hqq <= e_rtn).all()), name
        den_rtn, den_hqq = den_rtn + e_rtn.sum().item(), den_hqq + e_hqq.sum().item()
    gain = 10 * math.log10(den_rtn / den_hqq)
    assert gain >= REAL_MIN_GAIN[bits, symmetric], gain


def test_recipe_method_hqq_compresses_without_calibration(tiny_model_dir, tmp_path):
    """method: hqq runs through the engine with no calibration text, every layer at most RTN's weight
    error, saves as compressed-tensors, and refuses clip search / GGUF grids in the recipe."""
    import frugal
    from frugal.config import Recipe
    from frugal.errors import FrugalError

    src = tiny_model_dir("llama")
    weights = {"bits": 3, "group_size": 32, "symmetric": False}
    hqq = frugal.compress(src, {"method": "hqq", "weights": weights})
    rtn = frugal.compress(src, {"method": "rtn", "weights": weights})
    assert hqq.report.calibration == {"source": None}
    worse = [n for n, r in hqq.report.layers.items() if r.weight_rel_error > rtn.report.layers[n].weight_rel_error + 1e-7]
    assert not worse
    assert (sum(r.weight_rel_error for r in hqq.report.layers.values())
            < 0.97 * sum(r.weight_rel_error for r in rtn.report.layers.values()))
    hqq.save(tmp_path / "out")
    assert (tmp_path / "out" / "frugal.json").is_file()
    with pytest.raises(FrugalError, match="method=hqq"):
        Recipe.from_dict({"method": "hqq", "clip": {"enabled": True}})
