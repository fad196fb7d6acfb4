"""GPTQ: Hessian accumulation, output error against RTN, dead inputs, dampening retries, determinism."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch

from frugal.config import GPTQOptions, WeightScheme
from frugal.errors import FrugalError
from frugal.quant.gptq import Hessian, gptq_quantize
from frugal.quant.grid import QuantizedWeight, qrange
from frugal.quant.rtn import rtn_quantize

IN, OUT, TOKENS = 256, 64, 1024
LOGGER = "frugal.quant.gptq"


@functools.lru_cache(maxsize=None)
def correlated(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs X = Z A with 8 large-magnitude channels, a Gaussian weight W and H = 2/n X^T X."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, IN, generator=g) @ (torch.randn(IN, IN, generator=g) / math.sqrt(IN))
    x[:, torch.randperm(IN, generator=g)[:8]] *= 10
    w = torch.randn(OUT, IN, generator=g)
    return x, w, 2.0 / TOKENS * x.T @ x


def output_err(x: torch.Tensor, w: torch.Tensor, qw: QuantizedWeight) -> float:
    """||X (W - Q)^T||^2, the layer-output error GPTQ minimises."""
    return (x @ (w - qw.dequantize()).T).pow(2).sum().item()


def gptq(w, h, scheme, name="layer", **opts):
    """GPTQ with float32 scales and the given GPTQOptions fields."""
    return gptq_quantize(w, h, scheme, GPTQOptions(**opts), scale_dtype=torch.float32, name=name)


def same_weight(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    """Codes, scales and zero points all bit-identical."""
    zp = (a.zero_point is None and b.zero_point is None) or torch.equal(a.zero_point, b.zero_point)
    return torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and zp


def indefinite(n: int = 64, neg: float = -0.05, seed: int = 1) -> torch.Tensor:
    """Symmetric matrix with eigenvalues 1 (n - 1 times) and `neg`: mean(diag) ~ 1."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    lam = torch.ones(n)
    lam[-1] = neg
    return q @ torch.diag(lam) @ q.T


def test_hessian_accumulates_two_over_n_xtx():
    """Hessian.add over batches of (..., in) activations equals 2/n X^T X of all tokens."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 50, 32, generator=g), torch.randn(7, 32, generator=g), torch.randn(3, 1, 32, generator=g)]
    hs = Hessian(32)
    for b in batches:
        hs.add(b)
    x = torch.cat([b.reshape(-1, 32) for b in batches]).double()
    assert hs.n == 100 + 7 + 3
    expected = 2.0 / x.shape[0] * x.T @ x
    h = hs.matrix()
    assert h.dtype == torch.float32 and h.shape == (32, 32)
    torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(h, h.T)


def test_hessian_without_inputs_raises():
    """A layer that saw no calibration inputs is a FrugalError."""
    with pytest.raises(FrugalError, match="calibration inputs"):
        Hessian(8).matrix()


SCHEMES = [WeightScheme(4, 64, True), WeightScheme(3, 64, True), WeightScheme(4, -1, True),
           WeightScheme(3, -1, True), WeightScheme(4, 64, False)]


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"b{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
def test_gptq_beats_rtn_on_correlated_inputs(scheme, act_order):
    """GPTQ's layer-output error is well below RTN's (measured <= 0.69x natural order, <= 0.22x act-order)."""
    x, w, h = correlated()
    rtn = output_err(x, w, rtn_quantize(w, scheme, scale_dtype=torch.float32))
    res = gptq(w, h, scheme, act_order=act_order)
    qmin, qmax = qrange(scheme.bits)
    assert int(res.weight.q.min()) >= qmin and int(res.weight.q.max()) <= qmax
    assert output_err(x, w, res.weight) <= (0.35 if act_order else 0.8) * rtn
    assert res.damp == pytest.approx(0.01)


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("scheme", [WeightScheme(4, 64, True), WeightScheme(3, -1, False)], ids=["b4g64s", "b3ga"])
def test_loss_is_dampened_objective(scheme, act_order):
    """The reported loss is half of tr((W - Q) (H + damp * mean(diag H) I) (W - Q)^T)."""
    _, w, h = correlated()
    res = gptq(w, h, scheme, act_order=act_order)
    d = w - res.weight.dequantize()
    hd = h + res.damp * h.diag().mean() * torch.eye(IN)
    assert 2 * res.loss == pytest.approx(torch.trace(d @ hd @ d.T).item(), rel=1e-4)


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dead_inputs_give_zero_columns(symmetric, act_order):
    """An input column that is always zero makes its weight column reconstruct to exactly zero."""
    x, w, _ = correlated()
    dead = [3, 100, 200]
    x = x.clone()
    x[:, dead] = 0
    h = 2.0 / TOKENS * x.T @ x
    res = gptq(w, h, WeightScheme(4, 64, symmetric), act_order=act_order)
    w_hat = res.weight.dequantize()
    assert torch.isfinite(w_hat).all() and math.isfinite(res.loss)
    assert torch.equal(w_hat[:, dead], torch.zeros(OUT, len(dead)))
    if symmetric:
        assert torch.equal(res.weight.q[:, dead], torch.zeros(OUT, len(dead), dtype=torch.int8))
    else:
        assert torch.equal(res.weight.q[:, dead], res.weight.zero_point[:, [d // 64 for d in dead]])
    assert output_err(x, w, res.weight) <= 0.8 * output_err(x, w, rtn_quantize(w, WeightScheme(4, 64, symmetric)))


def test_rank_deficient_hessian_retries_with_warning(caplog):
    """A rank-deficient H with tiny dampening fails Cholesky, retries with more, and warns naming the layer."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 64, generator=g)  # 16 tokens: rank 16 of 64
    w = torch.randn(8, 64, generator=g)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = gptq(w, 2.0 / 16 * x.T @ x, WeightScheme(4, 32, True), name="model.layers.3.mlp.down_proj",
                   dampening=1e-9)
    assert res.damp > 1e-9
    assert torch.isfinite(res.weight.dequantize()).all()
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.layers.3.mlp.down_proj" in warnings[0].getMessage()


def test_indefinite_hessian_needs_exactly_one_retry(caplog):
    """Eigenvalue -0.05 of mean-1 H: dampening 0.01 fails, the 10x retry (0.1) succeeds."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = gptq(w, indefinite(), WeightScheme(4, 32, True), name="blk.q_proj")
    assert res.damp == pytest.approx(0.1)
    assert any("blk.q_proj" in r.getMessage() and "0.1" in r.getMessage() for r in caplog.records)


def test_positive_definite_hessian_does_not_warn(caplog):
    """A well-conditioned Hessian keeps the initial dampening and logs nothing."""
    _, w, h = correlated()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = gptq(w[:8], h, WeightScheme(4, 64, True), dampening=0.02)
    assert res.damp == 0.02
    assert not [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("h", [torch.full((64, 64), float("nan")), -torch.eye(64)], ids=["nan", "negative"])
def test_hopeless_hessian_raises_naming_layer(h):
    """A Hessian no dampening can fix (NaN, negative definite) is a FrugalError naming the layer."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    with pytest.raises(FrugalError, match=r"model\.layers\.7\.self_attn\.o_proj"):
        gptq(w, h, WeightScheme(4, 32, True), name="model.layers.7.self_attn.o_proj")


def test_retry_budget_is_respected():
    """With max_damp_retries=0 a failing Cholesky raises instead of retrying."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    with pytest.raises(FrugalError, match="indef_layer"):
        gptq(w, indefinite(), WeightScheme(4, 32, True), name="indef_layer", max_damp_retries=0)
    assert gptq(w, indefinite(), WeightScheme(4, 32, True), max_damp_retries=1).damp == pytest.approx(0.1)


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
def test_deterministic(act_order):
    """Two runs on the same inputs give bit-identical codes, scales and loss."""
    _, w, h = correlated(1)
    a = gptq(w, h, WeightScheme(3, 32, False), act_order=act_order, block_size=48)
    b = gptq(w, h, WeightScheme(3, 32, False), act_order=act_order, block_size=48)
    assert same_weight(a.weight, b.weight) and a.loss == b.loss


@pytest.mark.parametrize("block_size", [1, 32, 100, 512])
def test_lazy_batch_size_does_not_change_result(block_size):
    """Lazy batching is an exact reordering: any block size gives the same codes as block 128 (up to float ties)."""
    x, w, h = correlated(2)
    ref = gptq(w, h, WeightScheme(4, 64, True), block_size=128)
    res = gptq(w, h, WeightScheme(4, 64, True), block_size=block_size)
    assert (res.weight.q != ref.weight.q).float().mean().item() <= 0.002
    assert output_err(x, w, res.weight) == pytest.approx(output_err(x, w, ref.weight), rel=0.01)


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("scheme", [WeightScheme(4, -1, True), WeightScheme(4, -1, False), WeightScheme(3, 32, False),
                                    WeightScheme(2, 128, True), WeightScheme(8, 64, True)],
                         ids=["b4cs", "b4ca", "b3g32a", "b2g128s", "b8g64s"])
def test_identity_hessian_equals_rtn(scheme, act_order):
    """With H = I no error is propagated, so GPTQ's codes and grids equal RTN's exactly (static and dynamic groups)."""
    _, w, _ = correlated()
    res = gptq(w, torch.eye(IN), scheme, act_order=act_order)
    assert same_weight(res.weight, rtn_quantize(w, scheme, scale_dtype=torch.float32))


def test_static_groups_keep_file_layout_under_act_order():
    """With act-order the grids come from the original weights, so they equal RTN's grids group by group."""
    _, w, h = correlated()
    scheme = WeightScheme(4, 32, False)
    res = gptq(w, h, scheme, act_order=True)
    rtn = rtn_quantize(w, scheme, scale_dtype=torch.float32)
    assert torch.equal(res.weight.scale, rtn.scale) and torch.equal(res.weight.zero_point, rtn.zero_point)
    assert not torch.equal(res.weight.q, rtn.q)


def test_tiny_group_with_float16_scales_stays_finite():
    """A near-zero group whose scale underflows in float16 must not poison the rest of its row."""
    x, w, h = correlated()
    w = w[:2, :64].to(torch.float16)
    w[0, :32] = 0.0
    w[0, 31] = 1.2e-7  # float16 subnormal: max|w| / 7.5 rounds to 0 in float16
    res = gptq_quantize(w, h[:64, :64], WeightScheme(4, 32, True), GPTQOptions(act_order=False))
    assert math.isfinite(res.loss)
    assert (res.weight.scale != 0).all()
    assert (w[0, 32:].float() - res.weight.dequantize()[0, 32:]).abs().max() <= res.weight.scale[0, 1].float().abs()


@pytest.mark.parametrize("act_order", [True, False])
def test_single_threaded_column_sweep_gives_the_same_bytes(monkeypatch, act_order):
    """The column loop runs on one thread (speed); element-wise updates do not depend on the thread count,
    so the codes, scales and loss equal the all-threads sweep's."""
    from frugal.quant import gptq
    from frugal.quant.options import ClipSearch, GPTQOptions, WeightScheme

    torch.manual_seed(0)
    w = torch.randn(192, 128)
    x = torch.randn(1024, 128) * torch.rand(128) * 3
    h = 2 * x.T @ x / 1024
    args = (h, WeightScheme(4, 32, False), GPTQOptions(act_order=act_order), ClipSearch(True), torch.float16)
    with gptq.threads(2):  # the Cholesky factors and the lazy-batch updates on 2 threads in both runs
        one = gptq.gptq_quantize(w.clone(), *args)
        monkeypatch.setattr(gptq, "SINGLE_THREAD_ROWS", 0)
        many = gptq.gptq_quantize(w.clone(), *args)
    assert torch.equal(one.weight.q, many.weight.q) and torch.equal(one.weight.scale, many.weight.scale)
    assert one.loss == many.loss


@pytest.mark.parametrize("act_order,clip", [(True, False), (False, True)], ids=["static", "dynamic-clip"])
def test_shared_hessian_sweep_equals_one_layer_at_a_time(act_order, clip):
    """q/k/v (or gate/up) read the same inputs: one sweep over their stacked rows gives every weight the
    codes, grids and loss it gets alone, bit for bit (dead inputs and float16 weights included)."""
    from frugal.quant.gptq import gptq_quantize_shared
    from frugal.quant.options import ClipSearch

    torch.manual_seed(3)
    x = torch.randn(1024, 128) * torch.rand(128) * 3
    x[:, 7] = 0  # a dead input
    h = 2 * x.T @ x / 1024
    ws = [torch.randn(rows, 128).to(torch.float16) for rows in (64, 16, 16)]
    args = (WeightScheme(4, 32, not clip), GPTQOptions(act_order=act_order, block_size=64), ClipSearch(clip),
            torch.float16)
    stacked = gptq_quantize_shared(ws, h, *args, names=["q", "k", "v"])
    for w, res in zip(ws, stacked):
        alone = gptq_quantize(w, h, *args)
        assert same_weight(res.weight, alone.weight)
        assert res.loss == alone.loss and res.damp == alone.damp
