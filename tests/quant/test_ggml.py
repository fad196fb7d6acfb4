"""GGML block grids: exact packing (checked against gguf-py's dequantizers), error bounds against
llama.cpp's reference quantizer, GPTQ onto a GGML grid, and llama.cpp's per-tensor type rules."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from frugal.quant.ggml import TYPES, make_grid, pack
from frugal.quant.ggml_policy import layer_type, tensor_type, use_more_bits
from frugal.quant.gptq import GPTQOptions, gptq_ggml

LEGACY = ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1")


def weights(seed: int, rows: int = 6, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, 7] = 1.5  # an outlier
    w[1] = 0.0  # an all-zero row
    w[2] = w[2].abs() + 0.01  # a positive-only row
    w[3] = -w[3].abs()  # a non-positive row
    return w


def gguf_dequantize(raw: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, name))


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_bytes_dequantize_to_frugal_weights_exactly(name, seed):
    gw = make_grid(weights(seed), name)
    raw = pack(gw)
    t = TYPES[name]
    assert raw.dtype == np.uint8 and raw.shape == (6, 512 // t.block * t.nbytes)
    assert np.array_equal(gguf_dequantize(raw, name), gw.dequantize().numpy())
    assert gw.nbytes() == raw.nbytes


@pytest.mark.parametrize("name", list(TYPES))
def test_codes_stay_in_range_and_zero_rows_stay_zero(name):
    gw = make_grid(weights(2), name)
    t = TYPES[name]
    assert int(gw.q.min()) >= t.qmin and int(gw.q.max()) <= t.qmax
    assert torch.equal(gw.dequantize()[1], torch.zeros(512))


@pytest.mark.parametrize("name", LEGACY)
def test_rtn_error_no_worse_than_llama_cpp_reference(name):
    """gguf-py's quantizers are bit-exact ports of llama.cpp's reference ones (no importance matrix)."""
    w = weights(3)
    ref = gguf_dequantize(gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, name)), name)
    ours = make_grid(w, name).dequantize().numpy()
    err_ref = np.linalg.norm(ref - w.numpy(), axis=1)
    err_ours = np.linalg.norm(ours - w.numpy(), axis=1)
    assert np.all(err_ours <= err_ref * (1 + 1e-6) + 1e-9)


@pytest.mark.parametrize("name,bound", [("Q4_K", 0.09), ("Q5_K", 0.045), ("Q6_K", 0.023), ("Q8_0", 0.0065)])
def test_relative_error_bounds(name, bound):
    w = torch.randn(16, 1024, generator=torch.Generator().manual_seed(4)) * 0.02
    err = (make_grid(w, name).dequantize() - w).norm() / w.norm()
    assert err < bound


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_gptq_onto_ggml_grid_beats_rounding_to_nearest(name):
    """Correlated inputs: GPTQ's error feedback lowers the output error tr(dW H dW^T) on the same grid."""
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(256, 256, generator=g) / 16
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + mix)  # (tokens, in)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 256, generator=g) * 0.05

    def out_err(w_hat):
        d = w_hat - w
        return float(torch.einsum("oi,ij,oj->", d, h, d))

    res = gptq_ggml(w, h, name, GPTQOptions())
    raw = pack(res.weight)
    assert np.array_equal(gguf_dequantize(raw, name), res.weight.dequantize().numpy())
    rtn = make_grid(w, name, importance=torch.diag(h))
    assert torch.equal(res.weight.scale, rtn.scale)  # the same grid, only the rounding differs
    assert out_err(res.weight.dequantize()) < 0.8 * out_err(rtn.dequantize())


def test_q4_k_m_types_follow_llama_cpp_rules():
    """30 layers like the default model: q/k/v/o/gate/up rows of 576 (not a multiple of 256), down of 1536."""
    more = [i for i in range(30) if use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert tensor_type("Q4_K_M", "attn_v", 5, 30, True, 576) == "Q8_0"  # Q6_K, falls back
    assert tensor_type("Q4_K_M", "attn_v", 6, 30, True, 576) == "Q5_0"  # Q4_K, falls back
    assert tensor_type("Q4_K_M", "ffn_down", 5, 30, True, 1536) == "Q6_K"
    assert tensor_type("Q4_K_M", "ffn_down", 6, 30, True, 1536) == "Q4_K"
    assert tensor_type("Q4_K_M", "token_embd", 0, 30, True, 576) == "Q8_0"  # tied: output rules
    assert tensor_type("Q4_K_M", "token_embd", 0, 30, False, 512) == "Q4_K"
    assert tensor_type("Q4_K_M", "output", 0, 30, False, 512) == "Q6_K"
    assert tensor_type("Q4_0", "attn_q", 3, 30, True, 576) == "Q4_0"
    assert tensor_type("Q4_0", "token_embd", 0, 30, True, 576) == "Q8_0"
    assert tensor_type("Q4_K_S", "attn_v", 3, 30, True, 512) == "Q5_K"
    assert layer_type("Q5_K_M", "model.layers.29.mlp.down_proj", 30, True, 1536) == "Q6_K"
    assert layer_type("Q5_K_M", "model.layers.12.self_attn.q_proj", 30, True, 576) == "Q5_1"
