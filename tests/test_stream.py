"""Streaming compression (frugal.compression.stream): the same quantized tensors, config and frugal.json as the
in-memory path, block by block, with activations in RAM or on disk; the output loads in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CALIB_TEXT, dir_digest

GPTQ = {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration": {"num_samples": 3, "seq_len": 32}}
IDS = torch.randint(3, 512, (3, 32), generator=torch.Generator().manual_seed(0))  # calibration without tokenizing


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _assert_same_checkpoint(mem: Path, stream: Path) -> None:
    """Every tensor bit-identical (sharding aside) and the same config.json and frugal.json bytes."""
    a, b = _tensors(mem), _tensors(stream)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in ("config.json", "frugal.json", "generation_config.json"):
        assert (mem / f).read_bytes() == (stream / f).read_bytes(), f


CASES = {  # name: (family, config overrides, recipe, calibration)
    "llama": ("llama", {}, GPTQ, str(CALIB_TEXT)),
    # sliding and full attention layers: different masks and rotary embeddings per block
    "gemma3": ("gemma3", {}, GPTQ, IDS),
    # blocks at model.decoder.layers; project_in/out outside the blocks are quantized from the replay
    "opt-asym-3bit": ("opt", {}, {**GPTQ, "weights": {"bits": 3, "group_size": -1, "symmetric": False}}, IDS),
    "phi3": ("phi3", {}, GPTQ, IDS),
    # a tied head quantized too: untied, its Hessian from the replayed last block
    "llama-tied-head": ("llama", {"tie_word_embeddings": True}, {**GPTQ, "ignore": []}, IDS),
    "qwen3-rtn": ("qwen3", {}, {"method": "rtn", "weights": {"bits": 4, "group_size": 64}}, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_equals_in_memory(tiny_model_factory, tmp_path, case):
    import frugal
    from frugal.compression.stream import compress_streaming

    family, overrides, recipe, calibration = CASES[case]
    src = tiny_model_factory(family, **overrides)
    frugal.compress(str(src), recipe, calibration).save(tmp_path / "mem")
    out = compress_streaming(str(src), recipe, tmp_path / "stream", calibration)
    _assert_same_checkpoint(tmp_path / "mem", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem", "stream"]  # work directory removed


def test_activations_on_disk_give_the_same_bytes(tiny_model_factory, tmp_path):
    """With a zero activation budget each block reads its inputs from a file on disk, and the output is
    byte-identical to the in-RAM run; the output directory appears only at the end."""
    from frugal.compression.stream import compress_streaming

    src = tiny_model_factory("gemma3")
    seen = []

    def progress(event, block):
        work = tmp_path / ".disk.stream-work"
        if event == "block-start":
            seen.append(sorted(p.name for p in work.glob("acts-*.safetensors")))
        assert not (tmp_path / "disk").exists()

    compress_streaming(str(src), GPTQ, tmp_path / "ram", IDS)
    compress_streaming(str(src), GPTQ, tmp_path / "disk", IDS, activation_budget=0, progress=progress)
    assert seen == [["acts-00000.safetensors"], ["acts-00001.safetensors"]]
    assert dir_digest(tmp_path / "ram") == dir_digest(tmp_path / "disk")


def test_output_loads_in_transformers(tiny_model_factory, tmp_path):
    """The sharded output reloads with the logits of the in-memory compressed model."""
    import transformers

    import frugal
    from frugal.compression.stream import compress_streaming

    src = tiny_model_factory("llama")
    res = frugal.compress(str(src), GPTQ, IDS)
    out = compress_streaming(str(src), GPTQ, tmp_path / "s", IDS)
    assert len(list(out.glob("model-*.safetensors"))) == 3  # one shard per block + the outside pieces
    from frugal.load.model import load_model

    ids = torch.arange(3, 40)[None]
    exact = load_model(out).model  # frugal's reader: (q - z) * s in float32, the model frugal measured
    # transformers multiplies codes by the 16-bit scales in 16 bits: one more rounding of every weight
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(exact(ids).logits, res.model(ids).logits)
        assert (reloaded(ids).logits - res.model(ids).logits).abs().max() <= 2e-2


def test_refusals_before_work(tiny_model_factory, tmp_path):
    from frugal.errors import FrugalError
    from frugal.compression.stream import compress_streaming

    src = tiny_model_factory("llama")
    with pytest.raises(FrugalError, match="gguf_type=Q4_0: streaming writes compressed-tensors"):
        compress_streaming(str(src), {"gguf_type": "Q4_0"}, tmp_path / "a")
    with pytest.raises(FrugalError, match="--data-free: streaming cannot"):
        compress_streaming(str(src), GPTQ, tmp_path / "b", "data-free")
    (tmp_path / "c").mkdir()
    with pytest.raises(FrugalError, match="output already exists"):
        compress_streaming(str(src), GPTQ, tmp_path / "c", IDS)
    with pytest.raises(FrugalError, match="not a multiple of group size 128"):
        compress_streaming(str(src), {"weights": {"group_size": 128}, "strict_groups": True}, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_slot_file_round_trip(tmp_path):
    """Activation files are safetensors with exact float bits, written one slot at a time."""
    from safetensors.torch import load_file

    from frugal.errors import FrugalError
    from frugal.compression.workdir import SlotFile, SlotWriter, write_slots

    xs = [torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    write_slots(tmp_path / "a.safetensors", xs)
    back = SlotFile(tmp_path / "a.safetensors")
    assert len(back) == 4 and all(torch.equal(x, y) for x, y in zip(xs, back))
    assert all(torch.equal(load_file(tmp_path / "a.safetensors")[f"{j:05d}"], x) for j, x in enumerate(xs))
    w = SlotWriter(tmp_path / "b.safetensors", 2, (1, 5, 3), torch.float32)
    w.write(0, xs[0])
    with pytest.raises(FrugalError, match="1 of 2 slots written"):
        w.close()
    assert not (tmp_path / "b.safetensors").exists()  # never visible half-written


def test_cli_stream_matches_in_memory_and_refuses_what_needs_memory(tiny_model_factory, tmp_path, monkeypatch):
    """`frugal compress --stream` writes what the in-memory path writes; a job the pre-flight says cannot
    fit is refused in one line unless --force; --stream with another format is refused."""
    import frugal.cli.main as cli
    from frugal.compression import preflight

    model = tiny_model_factory("llama")
    args = ["compress", str(model), "--method", "rtn", "--bits", "4", "--group-size", "32", "--no-eval"]
    assert cli.main(args + ["--no-stream", "-o", str(tmp_path / "mem")]) == 0
    assert cli.main(args + ["--stream", "-o", str(tmp_path / "st")]) == 0
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")
    assert cli.main(args + ["--stream", "--format", "gguf", "-o", str(tmp_path / "g")]) == 2
    monkeypatch.setattr(preflight, "available_ram_bytes", lambda: 1 << 20)  # a 1 MB machine
    assert cli.main(args + ["-o", str(tmp_path / "small")]) == 2 and not (tmp_path / "small").exists()
    assert cli.main(args + ["--force", "-o", str(tmp_path / "forced")]) == 0
