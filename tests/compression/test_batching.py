"""Batched block forwards (recipe.calibration.batch_size): the calibration sequences go through each block
`batch_size` at a time, the statistics are summed sequence by sequence, so every quantized tensor is the
same bytes at any batch size, for every family (masks and rotary embeddings captured at batch 1 broadcast),
in memory and streamed, a ragged last batch included."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES

IDS = torch.randint(3, 512, (5, 32), generator=torch.Generator().manual_seed(1))  # 5: ragged batches of 2 and 4


def _recipe(batch: int, **extra) -> dict:
    return {"method": "gptq", "weights": {"bits": 4, "group_size": 32, "symmetric": False}, "ignore": [],
            "calibration": {"num_samples": 5, "seq_len": 32, "batch_size": batch}, **extra}


def _codes(result) -> dict[str, tuple[torch.Tensor, ...]]:
    return {n: (q.q, q.scale, q.zero_point) for n, q in result.quantized.items()}


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert (x is None and y is None) or torch.equal(x, y), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gptq_codes_do_not_depend_on_the_batch_size(tiny_model_factory, family):
    """GPTQ with the head quantized (Hessians inside and outside the blocks): batch 1, 2 and 4 agree."""
    import frugal

    src = tiny_model_factory(family)
    results = [_codes(frugal.compress(str(src), _recipe(b), IDS)) for b in (1, 2, 4)]
    for other in results[1:]:
        _assert_same(results[0], other)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_awq_statistics_do_not_depend_on_the_batch_size(tiny_model_factory, family):
    """AWQ's activation statistics (a token subsample per sequence) and the following GPTQ agree too."""
    import frugal

    src = tiny_model_factory(family)
    a, b = (_codes(frugal.compress(str(src), _recipe(bt, awq={"enabled": True}), IDS)) for bt in (1, 3))
    _assert_same(a, b)


def test_streamed_batches_equal_in_memory_batch_one(tiny_model_factory, tmp_path):
    """The streaming engine replays saved block outputs batch by batch into the tied head's Hessian."""
    import frugal
    from conftest import read_tensors as tensors

    from frugal.compression.stream import compress_streaming

    src = tiny_model_factory("llama", tie_word_embeddings=True)
    mem = frugal.compress(str(src), _recipe(1), IDS).save(tmp_path / "mem")
    streamed = compress_streaming(str(src), frugal.Recipe.from_dict(_recipe(4)), tmp_path / "s", IDS)
    a, b = tensors(mem), tensors(streamed)
    assert sorted(a) == sorted(b) and any("lm_head" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_size_is_validated():
    import frugal
    from frugal.errors import FrugalError

    with pytest.raises(FrugalError, match="batch_size=0"):
        frugal.Recipe.from_dict(_recipe(0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_statistics_pass_stops_at_the_last_hooked_layer(tiny_model_factory, family, monkeypatch):
    """The statistics pass (Hessians, AWQ's activation statistics) ends each call once every hooked layer
    was fed: the Hessians equal those of whole calls bit for bit, and the block's last layer runs only in
    the first call (the one that checks each layer is fed exactly once)."""
    from frugal.compression import hooks as H
    from frugal.compression.engine import block_hessians
    from frugal.load.blocks import block_linears, find_blocks
    from frugal.load.model import load_model

    model = load_model(str(tiny_model_factory(family))).model
    _, blocks = find_blocks(model)
    inputs = H.capture_block_inputs(model, blocks, IDS)
    layers = block_linears(blocks[0], "b0", ())
    last = list(layers.values())[-1]
    ran = []
    handle = last.register_forward_hook(lambda *_: ran.append(1))
    early = block_hessians(layers, blocks[0], inputs.hidden, inputs.args, inputs.kwargs_per_block[0], "b0", 2)[0]
    assert len(ran) == 1  # batches of 2, 2, 1: only the first ran to the end
    monkeypatch.setattr(H.InputHooks, "settle", lambda self: None)
    whole = block_hessians(layers, blocks[0], inputs.hidden, inputs.args, inputs.kwargs_per_block[0], "b0", 2)[0]
    handle.remove()
    assert len(ran) == 4
    for name in layers:
        assert torch.equal(early[name], whole[name]), name


def test_a_layer_called_twice_keeps_every_call_whole():
    """A block that calls one hooked layer twice per forward is never cut short (its second input counts)."""
    from frugal.compression.hooks import HessianHooks, feed_batched

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    torch.manual_seed(0)
    block, xs = Twice(), [torch.randn(1, 3, 4) for _ in range(3)]
    layers = {"a": block.a, "b": block.b}
    with HessianHooks(layers) as hooks:
        feed_batched(block, xs, (), {}, 1, hooks)
    assert not hooks.stop_early and hooks.hessians["a"].n == 2 * 3 * 3
