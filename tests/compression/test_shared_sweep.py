"""Layers that read the same input (q/k/v, gate/up) share one Hessian and are rounded in one GPTQ sweep over
their stacked rows (Method.quantize_shared). The sweep is a speed change only: every family's codes, grids
and layer reports equal those of rounding one layer at a time, in memory and streamed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import FAMILIES

IDS = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(2))


def _recipe(**extra) -> dict:
    return {"method": "gptq", "weights": {"bits": 4, "group_size": 32, "symmetric": False}, "ignore": [],
            "calibration": {"num_samples": 4, "seq_len": 32}, **extra}


@pytest.fixture
def one_at_a_time(monkeypatch):
    """GPTQ's registry record without quantize_shared: every layer rounded alone."""
    from frugal.compression import methods

    records = methods.REGISTRY.records()
    monkeypatch.setitem(records, "gptq", dataclasses.replace(records["gptq"], quantize_shared=None))


def _outputs(result) -> tuple[dict, dict]:
    codes = {n: (q.q, q.scale, q.zero_point) for n, q in result.quantized.items()}
    reports = {n: {k: v for k, v in r.to_dict().items() if k != "seconds"} for n, r in result.report.layers.items()}
    return codes, reports


def _assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert list(a[0]) == list(b[0])  # same layers, same order
    for name in a[0]:
        for x, y in zip(a[0][name], b[0][name]):
            assert (x is None and y is None) or torch.equal(x, y), name
    assert a[1] == b[1]  # losses, errors, dampening: bit-equal floats


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_sweep_gives_the_bytes_of_one_layer_at_a_time(tiny_model_factory, family, request):
    import frugal

    src = tiny_model_factory(family)
    stacked = _outputs(frugal.compress(str(src), _recipe(), IDS))
    request.getfixturevalue("one_at_a_time")
    alone = _outputs(frugal.compress(str(src), _recipe(), IDS))
    _assert_same(stacked, alone)


def test_llama_block_groups_qkv_and_gate_up(tiny_model_factory):
    """The grouping itself: q/k/v in one sweep, gate/up in one, o and down alone; a layer with its own
    override scheme leaves its group."""
    import frugal
    from frugal.compression.engine import block_hessians, shared_groups
    from frugal.compression.hooks import capture_block_inputs
    from frugal.load.blocks import block_linears, find_blocks
    from frugal.load.model import load_model

    model = load_model(str(tiny_model_factory("llama"))).model
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, IDS)
    layers = block_linears(blocks[0], "model.layers.0", [])
    hs = block_hessians(layers, blocks[0], inputs.hidden, inputs.args, inputs.kwargs_per_block[0], "block 0")[0]
    recipe = frugal.Recipe.from_dict(_recipe())
    short = [[n.rsplit(".", 1)[-1] for n in g] for g in shared_groups(layers, hs, recipe, {})]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    mixed = frugal.Recipe.from_dict(_recipe(overrides=[{"match": "*k_proj", "weights": {"bits": 8, "group_size": 32}}]))
    short = [[n.rsplit(".", 1)[-1] for n in g] for g in shared_groups(layers, hs, mixed, {})]
    assert ["q_proj", "v_proj"] in short and ["k_proj"] in short


def test_streamed_shared_sweep_equals_in_memory_one_layer_at_a_time(tiny_model_factory, tmp_path, request):
    """The streaming engine goes through the same block function: its tensors equal those of the in-memory
    engine rounding one layer at a time."""
    import frugal
    from conftest import read_tensors as tensors

    from frugal.compression.stream import compress_streaming

    src = tiny_model_factory("qwen2")
    streamed = compress_streaming(str(src), frugal.Recipe.from_dict(_recipe()), tmp_path / "s", IDS)
    request.getfixturevalue("one_at_a_time")
    mem = frugal.compress(str(src), _recipe(), IDS).save(tmp_path / "mem")
    a, b = tensors(mem), tensors(streamed)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
