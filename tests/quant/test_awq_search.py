"""AWQ's maths on tiny layers: activation statistics, the alpha search, the output-error clip search."""

from __future__ import annotations

import pytest
import torch

from frugal.config import WeightScheme
from frugal.quant.awq import (ActivationStats, awq_scales, clip_weight, output_error, rtn_quantizer, search_clip,
                              search_scales)
from frugal.quant.grid import params_from_range
from frugal.quant.rtn import rtn_quantize


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def outlier_layer(out_f: int = 96, in_f: int = 128, tokens: int = 2048, seed: int = 0):
    """(W, X): Gaussian weights and inputs whose channels 0..5 are 30x larger than the rest, as the
    activations after an LLM's norms are."""
    g = _gen(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02  # (out, in)
    x = torch.randn(tokens, in_f, generator=g)  # (tokens, in)
    x[:, :6] *= 30.0
    return w, x


def stats_of(x: torch.Tensor) -> ActivationStats:
    st = ActivationStats(x.shape[1])
    st.add(x)
    return st


def rel_output_error(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    """||(W_hat - W) X^T|| / ||W X^T||, measured directly on the tokens."""
    return float(((w_hat - w) @ x.T).norm() / (w @ x.T).norm())


def awq_rtn(w: torch.Tensor, x: torch.Tensor, scheme: WeightScheme, clip: bool = True) -> torch.Tensor:
    """The dequantized weight AWQ then RTN give, expressed in the original input space."""
    st = stats_of(x)
    res = search_scales([w], [rtn_quantizer(scheme)], st.mean_abs(), st.gram(), grid=20)
    ws = w * res.scales  # W diag(s)
    if clip:
        st.rescale(res.scales)
        lo, hi = search_clip(ws, st.gram(), scheme, torch.float32, grid=20, max_shrink=0.5)
        ws = clip_weight(ws, lo, hi)
    return rtn_quantize(ws, scheme).dequantize() / res.scales


def test_stats_are_mean_abs_and_gram_of_the_kept_tokens():
    """mean |x| and X^T X / n; at most `max_tokens` tokens, evenly spaced, first and last included."""
    x = torch.randn(100, 8, generator=_gen(1))
    st = ActivationStats(8)
    st.add(x[None], max_tokens=10)
    keep = x[torch.linspace(0, 99, 10).round().long()]
    assert st.n == 10
    assert torch.allclose(st.mean_abs(), keep.abs().mean(0), atol=1e-6)
    assert torch.allclose(st.gram(), keep.T @ keep / 10, atol=1e-5)
    whole = stats_of(x)
    assert whole.n == 100 and torch.allclose(whole.gram(), x.T @ x / 100, atol=1e-5)


def test_rescaled_stats_equal_the_stats_of_scaled_inputs():
    """After a fold divides the inputs by s, the statistics are those of x / s without re-running."""
    x = torch.randn(50, 6, generator=_gen(2))
    s = torch.rand(6, generator=_gen(3)) * 4 + 0.25
    st = stats_of(x)
    st.rescale(s)
    ref = stats_of(x / s)
    assert torch.allclose(st.mean_abs(), ref.mean_abs(), rtol=1e-5)
    assert torch.allclose(st.gram(), ref.gram(), rtol=1e-4, atol=1e-6)


def test_output_error_is_the_mean_squared_output_difference():
    dw = torch.randn(5, 7, generator=_gen(4))
    x = torch.randn(40, 7, generator=_gen(5))
    assert output_error(dw, stats_of(x).gram()) == pytest.approx(float((dw @ x.T).pow(2).sum() / 40), rel=1e-5)


def test_scales_are_normalised_and_alpha_zero_is_identity():
    a = torch.tensor([0.1, 1.0, 4.0, 40.0, 0.0])
    assert torch.equal(awq_scales(a, 0.0), torch.ones(5))
    s = awq_scales(a, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert bool((s > 0).all())  # a dead channel (a = 0) still gets a positive scale
    assert torch.all(s[1:4].diff() > 0)  # larger activations, larger scales


def test_uniform_activations_choose_alpha_zero():
    """When every channel has the same mean |x| (random signs), all s are 1: alpha = 0 is kept."""
    w = torch.randn(32, 64, generator=_gen(6))
    x = torch.randint(0, 2, (512, 64), generator=_gen(7)).float() * 2 - 1  # (tokens, in) of +-1
    st = stats_of(x)
    res = search_scales([w], [rtn_quantizer(WeightScheme(3, 32))], st.mean_abs(), st.gram(), grid=20)
    assert res.alpha == 0.0 and torch.equal(res.scales, torch.ones(64))
    assert res.loss == res.loss_identity


@pytest.mark.parametrize("bits", [3, 4])
def test_outlier_channels_choose_positive_alpha(bits):
    """A few large input channels: protecting them (alpha > 0) cuts the output error by over a quarter."""
    w, x = outlier_layer()
    st = stats_of(x)
    res = search_scales([w], [rtn_quantizer(WeightScheme(bits, 32))], st.mean_abs(), st.gram(), grid=20)
    assert 0.0 < res.alpha < 1.0
    assert res.loss < 0.75 * res.loss_identity
    assert bool((res.scales[:6] > res.scales[6:].max()).all())  # the outlier channels are scaled up


def test_pair_search_sums_the_layers_sharing_the_input():
    """The loss of a pair is the sum over its layers: equal to the single-layer losses added up."""
    w, x = outlier_layer()
    w2 = torch.randn(40, 128, generator=_gen(8)) * 0.05
    st = stats_of(x)
    q = rtn_quantizer(WeightScheme(4, 32))
    both = search_scales([w, w2], [q, q], st.mean_abs(), st.gram(), grid=10)
    s = both.scales
    parts = sum(output_error(q(m * s) / s - m, st.gram()) for m in (w, w2))
    assert both.loss == pytest.approx(parts, rel=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_rtn_beats_rtn_on_outlier_inputs(bits, symmetric):
    """On a layer with outlier input channels, AWQ + RTN's relative output error is < 0.72x RTN's
    (about half the squared error), on held-out tokens too; scales alone already help."""
    scheme = WeightScheme(bits, 32, symmetric)
    w, x = outlier_layer(seed=bits)
    _, held_out = outlier_layer(seed=100 + bits)
    rtn = rtn_quantize(w, scheme).dequantize()
    for xs in (x, held_out):
        base = rel_output_error(rtn, w, xs)
        assert rel_output_error(awq_rtn(w, x, scheme), w, xs) < 0.72 * base
        assert rel_output_error(awq_rtn(w, x, scheme, clip=False), w, xs) < 0.85 * base


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_worse_per_group_and_regrids_exactly(symmetric):
    """The chosen ranges never raise a group's output error (no shrink is a candidate), and RTN on
    the clamped weight computes exactly the searched grid."""
    scheme = WeightScheme(3, 32, symmetric)
    w = torch.randn(16, 64, generator=_gen(9))
    w[:, 5] *= 6  # a few large weights make clipping worthwhile
    x = torch.randn(256, 64, generator=_gen(10))
    gram = stats_of(x).gram()
    lo, hi = search_clip(w, gram, scheme, torch.float32, grid=20, max_shrink=0.5)
    wc = clip_weight(w, lo, hi)
    q_clip = rtn_quantize(wc, scheme)
    s, z = params_from_range(lo.reshape(-1), hi.reshape(-1), 3, symmetric, torch.float32, scheme.signed_scale)
    assert torch.equal(q_clip.scale.reshape(-1), s)
    if not symmetric:
        assert torch.equal(q_clip.zero_point.reshape(-1).float(), z)

    def group_errors(w_hat):  # (out, n_groups) output error of each group on its own inputs
        dw = (w_hat - w).reshape(16, 2, 32)
        g = gram.reshape(2, 32, 2, 32)[[0, 1], :, [0, 1], :]
        return torch.einsum("ogi,gij,ogj->og", dw, g, dw)

    clipped, plain = group_errors(q_clip.dequantize()), group_errors(rtn_quantize(w, scheme).dequantize())
    assert bool((clipped <= plain * (1 + 1e-5)).all())
    assert float(clipped.sum()) < 0.9 * float(plain.sum())
    assert bool((lo < 0).any()) and bool((hi.abs() < w.abs().reshape(16, 2, 32).amax(2)).any())


def test_clip_search_without_shrink_keeps_the_weight():
    w = torch.randn(8, 32, generator=_gen(11))
    lo, hi = search_clip(w, torch.eye(32), WeightScheme(4, -1), torch.float32, grid=5, max_shrink=1.0)
    assert torch.equal(clip_weight(w, lo, hi), w)
