"""`--format gptq`: known-answer packing at 2/3/4/8 bits, exact round trips through `read_gptq`,
the file's weights equal to frugal's in-memory model, deterministic bytes, early refusals, the float16
scale conversion measured, and (where gptqmodel is installed) a transformers reload."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import dir_digest

import frugal
from frugal.config import Recipe
from frugal.errors import FrugalError
from frugal.exporters.gptq import check, gptq_tensors, pack_codes, read_gptq, unpack_codes
from frugal.quant.grid import QuantizedWeight, qrange

BITS = (2, 3, 4, 8)
LOGGER = "frugal.exporters.gptq"


# -- reference packing, written as plainly as possible ---------------------------------------------
def signed32(u: int) -> int:
    """Unsigned 32-bit word as the int32 torch stores."""
    return u - (1 << 32) if u >= 1 << 31 else u


def reference_words(unsigned_codes: list[int], bits: int) -> list[int]:
    """One little-endian bit stream: code i at bits [i*bits, (i+1)*bits), cut into 32-bit words."""
    stream = 0
    for i, u in enumerate(unsigned_codes):
        assert 0 <= u < 1 << bits
        stream |= u << (i * bits)
    n_words = len(unsigned_codes) * bits // 32
    assert n_words * 32 == len(unsigned_codes) * bits
    return [signed32((stream >> (32 * j)) & 0xFFFFFFFF) for j in range(n_words)]


def one_row(codes: list[int], bits: int) -> dict[str, torch.Tensor]:
    """GPTQ tensors the exporter writes for a weight whose first output row holds `codes` (signed;
    32 output rows so that the zero points fill whole words too)."""
    q = torch.zeros(32, len(codes), dtype=torch.int8)
    q[0] = torch.tensor(codes, dtype=torch.int8)
    qw = QuantizedWeight(q=q, scale=torch.ones(32, 1, dtype=torch.float16), zero_point=None, bits=bits, group_size=-1)
    return gptq_tensors(qw, "gptq")


def pattern(bits: int, n: int = 64) -> list[int]:
    """An irregular row of signed codes that visits both ends of the grid."""
    qmin, qmax = qrange(bits)
    return [qmin + (7 * i * i + 3 * i + 1) % (qmax - qmin + 1) for i in range(n)]


# -- 1. known-answer packing -----------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_qweight_matches_reference_bit_stream(bits):
    codes = pattern(bits)
    t = one_row(codes, bits)
    expected = reference_words([c + (1 << (bits - 1)) for c in codes], bits)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (64 * bits // 32, 32)
    assert t["qweight"][:, 0].tolist() == expected


def test_qweight_literals():
    """Words checked by eye; at 3 bits, codes 10 and 21 straddle two words."""
    # 4 bits: unsigned codes 0..7 (signed -8..-1) in one word, code 0 in the lowest nibble.
    assert one_row(list(range(-8, 0)), 4)["qweight"][:, 0].tolist() == [0x76543210]
    # 8 bits: unsigned 1, 2, 3, 4.
    assert one_row([1 - 128, 2 - 128, 3 - 128, 4 - 128], 8)["qweight"][:, 0].tolist() == [0x04030201]
    # 2 bits: sixteen unsigned 3s fill a word; one unsigned 1 at position 15 is the top two bits 01.
    assert one_row([1] * 16, 2)["qweight"][:, 0].tolist() == [-1]
    assert one_row([-2] * 15 + [-1], 2)["qweight"][:, 0].tolist() == [0x40000000]
    # 3 bits, 32 codes in 3 words. Only code 10 = 7: bits 30, 31 of word 0 and bit 0 of word 1.
    row = [-4] * 32
    row[10] = 3
    assert one_row(row, 3)["qweight"][:, 0].tolist() == [signed32(0xC0000000), 1, 0]
    # Only code 21 = 7: bit 31 of word 1 and bits 0, 1 of word 2.
    row = [-4] * 32
    row[21] = 3
    assert one_row(row, 3)["qweight"][:, 0].tolist() == [0, signed32(0x80000000), 3]
    # Only code 31 = 5 (101): the top three bits of word 2.
    row = [-4] * 32
    row[31] = 1
    assert one_row(row, 3)["qweight"][:, 0].tolist() == [0, 0, signed32(0xA0000000)]


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_qzeros_are_v1_midpoint_minus_one(bits):
    """Symmetric grids: z = 2^(bits-1), stored minus one (v1): 0x55555555, 0x77777777, 0x7F7F7F7F, 3-bit 011s."""
    out = 32
    qw = QuantizedWeight(q=torch.zeros(out, 32, dtype=torch.int8), scale=torch.ones(out, 2, dtype=torch.float16),
                         zero_point=None, bits=bits, group_size=16)
    t = gptq_tensors(qw, "gptq")
    stored = (1 << (bits - 1)) - 1
    assert t["qzeros"].shape == (2, out * bits // 32)
    assert t["qzeros"][0].tolist() == reference_words([stored] * out, bits)
    literal = {2: 0x55555555, 4: 0x77777777, 8: 0x7F7F7F7F}
    if bits in literal:
        assert set(t["qzeros"].flatten().tolist()) == {literal[bits]}


@pytest.mark.parametrize("bits", BITS)
def test_layout_orientation(bits):
    """qweight packs each output row's codes down a column; qzeros packs each group's zeros along a row;
    scales are (groups, out) float16; g_idx is input // group size."""
    out_f, in_f, gs = 32, 64, 32
    g = torch.Generator().manual_seed(bits)
    qmin, qmax = qrange(bits)
    q = torch.randint(qmin, qmax + 1, (out_f, in_f), generator=g, dtype=torch.int8)
    z = torch.randint(qmin, qmax + 1, (out_f, 2), generator=g, dtype=torch.int8)
    s = torch.rand(out_f, 2, generator=g).to(torch.float16)
    t = gptq_tensors(QuantizedWeight(q, s, z, bits, gs), "gptq_v2")
    off = 1 << (bits - 1)
    assert t["qweight"].shape == (in_f * bits // 32, out_f)
    for o in (0, 5, 31):
        assert t["qweight"][:, o].tolist() == reference_words((q[o].int() + off).tolist(), bits)
    for grp in range(2):
        assert t["qzeros"][grp].tolist() == reference_words((z[:, grp].int() + off).tolist(), bits)
    assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"], s.T)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].tolist() == [i // gs for i in range(in_f)]


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_random(bits):
    u = torch.randint(0, 1 << bits, (7, 96), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_codes(pack_codes(u, bits), bits, 96), u)


def test_v1_cannot_hold_a_zero_point_of_zero():
    """v1 stores z - 1; an unsigned zero point 0 would be -1 and corrupt its neighbours on load."""
    qmin, _ = qrange(4)
    qw = QuantizedWeight(torch.zeros(8, 8, dtype=torch.int8), torch.ones(8, 1, dtype=torch.float16),
                         torch.full((8, 1), qmin, dtype=torch.int8), 4, -1)
    with pytest.raises(FrugalError, match="gptq_v2"):
        gptq_tensors(qw, "gptq")
    t = gptq_tensors(qw, "gptq_v2")
    assert t["qzeros"].tolist() == [[0]]


# -- compressed tiny models ------------------------------------------------------------------------
def recipe(bits: int, group: int, sym: bool, scale_dtype: str = "float16", ignore=("lm_head",)) -> dict:
    return {"method": "rtn", "ignore": list(ignore),
            "weights": {"bits": bits, "group_size": group, "symmetric": sym, "scale_dtype": scale_dtype}}


@pytest.fixture(scope="module")
def saved(tiny_model_factory, tmp_path_factory):
    """`saved(family, **recipe args)` -> (Compressed, GPTQ directory), each compressed once per module."""
    cache: dict = {}
    sources: dict = {}

    def get(family: str = "llama", bits: int = 4, group: int = 32, sym: bool = True, **more):
        key = (family, bits, group, sym, tuple(sorted(more.items())))
        if key not in cache:
            if family not in sources:
                sources[family] = tiny_model_factory(family)
            c = frugal.compress(str(sources[family]), recipe(bits, group, sym, **more))
            out = tmp_path_factory.mktemp("gptq") / "out"
            c.save(out, fmt="gptq")
            cache[key] = (c, out)
        return cache[key]

    return get


CONFIGS = [(b, g, s) for b in BITS for g in (-1, 32) for s in (True, False)]


def _cfg_id(c):
    return f"w{c[0]}-g{c[1]}-{'sym' if c[2] else 'asym'}"


# -- 2. and 3. exact round trip, and the file's weights are frugal's weights ------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_read_gptq_round_trip_is_exact(saved, cfg):
    bits, group, sym = cfg
    c, out = saved("llama", bits, group, sym)
    back = read_gptq(out)
    assert set(back) == set(c.quantized) and len(back) == 14
    modules = dict(c.model.named_modules())
    for name, qw in c.quantized.items():
        r = back[name]
        assert (r.bits, r.group_size) == (qw.bits, qw.group_size) == (bits, group)
        assert r.q.dtype == torch.int8 and torch.equal(r.q, qw.q)
        assert r.scale.dtype == qw.scale.dtype == torch.float16 and torch.equal(r.scale, qw.scale)
        if sym:
            assert r.zero_point is None and qw.zero_point is None
        else:
            assert r.zero_point.dtype == torch.int8 and torch.equal(r.zero_point, qw.zero_point)
        # 3. dequantizing the file gives exactly the weights frugal's model computes with
        assert torch.equal(r.dequantize(), modules[name].weight.detach())


@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_zero_point_of_zero_survives(tiny_model_factory, tmp_path, bits):
    """Rows of non-negative weights get the lowest zero point (unsigned 0), which v1 cannot store;
    asymmetric grids are written as gptq_v2, so it reads back exactly."""
    model = _model(tiny_model_factory("llama"))
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        w[:8] = w[:8].abs()
    c = frugal.compress(model, recipe(bits, 32, False))
    c.save(tmp_path / "o", fmt="gptq")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == cfg["format"] == "gptq_v2" and cfg["sym"] is False
    name = "model.layers.0.self_attn.q_proj"
    qmin, _ = qrange(bits)
    assert bool((c.quantized[name].zero_point[:8] == qmin).all())
    back = read_gptq(tmp_path / "o")
    for n, qw in c.quantized.items():
        assert torch.equal(back[n].zero_point, qw.zero_point) and torch.equal(back[n].q, qw.q)


def test_other_tensors_and_config(saved):
    """Float tensors (embeddings, norms, biases) are the model's own; quantization_config carries what
    transformers, optimum, GPTQModel and vLLM read."""
    c, out = saved("qwen2", 4, 32, True)  # Qwen2 has q/k/v biases
    tensors = load_file(str(out / "model.safetensors"))
    sd = c.model.state_dict()
    for name in c.quantized:
        assert f"{name}.weight" not in tensors
        assert {f"{name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")} <= set(tensors)
    floats = [k for k in tensors if not k.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales", "g_idx")]
    assert any(k.endswith("q_proj.bias") for k in floats)
    for k in floats:
        assert torch.equal(tensors[k], sd[k]), k
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
                   "lm_head": False, "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32",
                   "block_name_to_quantize": "model.layers", "meta": {"quantizer": [f"frugal:{frugal.__version__}"]}}
    export = json.loads((out / "frugal.json").read_text())["export"]
    assert export["format"] == "gptq" and export["max_weight_rel_change"] == 0.0


def test_layers_left_in_float_inside_blocks(saved):
    """A block layer the recipe ignores stays a float weight and is listed for optimum, GPTQModel, vLLM."""
    ignored = "model.layers.0.mlp.down_proj"
    c, out = saved("llama", 4, 32, True, ignore=("lm_head", ignored))
    tensors = load_file(str(out / "model.safetensors"))
    assert f"{ignored}.weight" in tensors and f"{ignored}.qweight" not in tensors
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert ignored not in cfg["modules_in_block_to_quantize"][0]
    assert sorted(cfg["modules_in_block_to_quantize"][0]) == sorted(c.quantized)
    assert list(cfg["dynamic"]) == ["-:^model\\.layers\\.0\\.mlp\\.down_proj$"]
    assert set(read_gptq(out)) == set(c.quantized)


# -- 4. determinism --------------------------------------------------------------------------------
def test_same_input_gives_identical_bytes(saved, tmp_path):
    c, out = saved("llama", 3, 32, False)
    c.save(tmp_path / "again", fmt="gptq")
    assert dir_digest(out) == dir_digest(tmp_path / "again")


# -- float16 scales --------------------------------------------------------------------------------
def test_float32_scales_are_converted_with_a_measured_warning(saved, tmp_path, caplog):
    c, _ = saved("llama", 4, 32, False, scale_dtype="float32")
    assert next(iter(c.quantized.values())).scale.dtype == torch.float32
    caplog.clear()  # the fixture's own save warned too
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        c.save(tmp_path / "o", fmt="gptq")
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "float16" in warnings[0]
    recorded = json.loads((tmp_path / "o" / "frugal.json").read_text())["export"]["max_weight_rel_change"]
    assert 0 < recorded < 1e-3
    back = read_gptq(tmp_path / "o")
    modules = dict(c.model.named_modules())
    worst = max(((back[n].dequantize() - modules[n].weight).norm() / modules[n].weight.norm()).item() for n in back)
    assert worst == pytest.approx(recorded, rel=1e-4)
    assert f"{recorded:.3g}" in warnings[0]


def test_exact_file_logs_no_warning(saved, tmp_path, caplog):
    c, _ = saved("llama", 4, 32, True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        c.save(tmp_path / "o", fmt="gptq")
    assert not [r for r in caplog.records if r.name == LOGGER]


# -- 5. refusals -----------------------------------------------------------------------------------
def _model(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path)


def _refusal(model, rec: dict) -> str:
    with pytest.raises(FrugalError) as e:
        check(model, Recipe.from_dict(rec))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--format gptq")
    return msg


def test_check_accepts_the_tiny_families(tiny_model_factory):
    for family in ("llama", "qwen2", "gemma3", "phi3"):
        model = _model(tiny_model_factory(family))
        for bits in BITS:
            check(model, Recipe.from_dict(recipe(bits, 32, True)))


def test_check_refuses_layers_outside_the_blocks(tiny_model_factory):
    opt = _model(tiny_model_factory("opt"))  # project_in / project_out sit outside model.decoder.layers
    msg = _refusal(opt, recipe(4, 32, True))
    assert "model.decoder.project_" in msg and "recipe.ignore" in msg
    check(opt, Recipe.from_dict(recipe(4, 32, True, ignore=("lm_head", "project_in", "project_out"))))
    llama = _model(tiny_model_factory("llama"))
    assert "lm_head" in _refusal(llama, recipe(4, 32, True, ignore=()))


def test_check_refuses_widths_that_do_not_fill_words(tiny_model_factory):
    model = _model(tiny_model_factory("llama", num_key_value_heads=1))  # k_proj/v_proj: 16 outputs
    msg = _refusal(model, recipe(3, 32, True))
    assert "k_proj" in msg and "out_features 16" in msg and "multiple of 32" in msg
    for bits in (2, 4, 8):  # 16 is a multiple of 32/gcd(bits, 32) = 16, 8, 4
        check(model, Recipe.from_dict(recipe(bits, 32, True)))


def test_save_refuses_before_writing(tiny_model_factory, tmp_path):
    """The writer re-checks what was actually quantized: a quantized lm_head is refused, nothing written."""
    c = frugal.compress(str(tiny_model_factory("llama")), recipe(4, 32, True, ignore=()))
    with pytest.raises(FrugalError, match="lm_head"):
        c.save(tmp_path / "o", fmt="gptq")
    assert list(tmp_path.iterdir()) == []


def test_read_gptq_refuses_other_formats(saved, tmp_path):
    c, _ = saved("llama", 4, 32, True)
    c.save(tmp_path / "ct")  # compressed-tensors
    with pytest.raises(FrugalError, match="not 'gptq'"):
        read_gptq(tmp_path / "ct")


# -- 6. reload with transformers + gptqmodel --------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
                    reason="gptqmodel and optimum are not installed in this environment (they live in "
                           "bench/.venvs/gptqmodel; run bench/gptq_reload.py there)")
@pytest.mark.parametrize("cfg", [(3, 32, True), (4, 32, False), (2, -1, False), (8, 32, True)], ids=_cfg_id)
def test_transformers_reload_gives_the_same_logits(saved, cfg):
    import transformers

    c, out = saved("llama", *cfg)
    qc = transformers.GPTQConfig(bits=cfg[0], backend="gptq_torch")
    m = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu", quantization_config=qc)
    for mod in m.modules():  # GPTQModel's CPU kernel multiplies in float16; float32 is frugal's arithmetic
        if isinstance(getattr(mod, "scales", None), torch.Tensor):
            mod.scales = mod.scales.float()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (m(ids).logits - c.model(ids).logits).abs().max().item()
    assert diff <= 1e-5
