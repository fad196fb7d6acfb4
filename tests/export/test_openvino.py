"""`--format openvino` on tiny random models: the OpenVINO CPU plugin computes what frugal's in-memory
model computes, decoding with the stateful KV cache matches one full forward, the IR holds frugal's
codes, scales and zero points bit for bit as u2/u4/i4/u8/i8 constants that the plugin runs as
compressed FullyConnected layers, output bytes are deterministic, and what cannot be held is refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import build_tiny_model, dir_digest

import frugal
from frugal.errors import FrugalError

ov = pytest.importorskip("openvino", reason="openvino is an optional dependency (pip install frugal[openvino])")

from frugal.exporters.openvino import XML_FILE  # noqa: E402
from frugal.exporters.openvino_runtime import OvCausalLM  # noqa: E402

# frugal's weights are reproduced exactly (float32 decompression), so the logits differ by float32
# rounding only (different summation order, fused RMS/RoPE/SDPA kernels). Bound: 1e-5 of the largest
# logit (observed: below 1e-6 on every case).
REL_TOL = 1e-5
SEQ = 48  # longer than Mistral's (32) and Gemma 3's (16) sliding windows


@dataclass(frozen=True)
class Case:
    family: str
    weights: dict
    ignore: tuple = ("lm_head",)
    config: dict = field(default_factory=dict)
    tag: str = ""

    @property
    def id(self) -> str:
        w = self.weights
        parts = [self.family, f"w{w['bits']}", f"g{w['group_size']}", "sym" if w.get("symmetric", True) else "asym",
                 w.get("scale_dtype", ""), "" if self.ignore else "lm_head", self.tag]
        return "-".join(p for p in parts if p)


def w(bits: int, group: int, symmetric: bool = True, **more: Any) -> dict:
    return {"bits": bits, "group_size": group, "symmetric": symmetric, **more}


CASES = [
    Case("llama", w(4, 64, False)),  # u4 + u4 zero points
    Case("llama", w(4, -1)),  # i4 per channel
    Case("llama", w(8, 32, False)),  # u8
    Case("llama", w(8, -1)),  # i8
    Case("llama", w(3, 64, False)),  # 3-bit codes in u4 containers
    Case("llama", w(2, 32)),  # u2, scalar zero point 2
    Case("llama", w(2, -1, False)),
    Case("llama", w(4, 32, scale_dtype="bfloat16"), ignore=()),  # quantized lm_head, bf16 scales
    Case("llama", w(4, 64, scale_dtype="float16"), config={"tie_word_embeddings": True}, tag="tied"),
    Case("mistral", w(4, 32)),  # sliding window
    Case("qwen2", w(4, 32, False)),  # q/k/v biases
    Case("qwen3", w(4, 64)),  # per-head q/k norms
    Case("gemma3", w(4, 32, scale_dtype="float16")),  # tied, (1 + w) and sandwich norms, gelu-tanh, two windows
]
CASE = {c.id: c for c in CASES}
KINDS = {"u2", "u4", "i4", "u8", "i8"}


@dataclass
class Exported:
    case: Case
    result: Any  # frugal.compression.result.Compressed
    out: Path
    lm: OvCausalLM


def _export(case: Case, root: Path) -> Exported:
    src = build_tiny_model(case.family, root / "src", **case.config)
    recipe = {"method": "rtn", "weights": case.weights, "ignore": list(case.ignore), "seed": 0}
    result = frugal.compress(src, recipe)
    out = result.save(root / "ov", fmt="openvino")
    return Exported(case, result, out, OvCausalLM(out))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared):
    """`exported(case)`: compress and write once per case, shared by the tests of this module."""
    cache: dict[str, Exported] = {}

    def get(case: Case) -> Exported:
        if case.id not in cache:
            cache[case.id] = _export(case, tmp_path_factory.mktemp(case.id))
        return cache[case.id]

    return get


def _ids(n: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _torch_logits(model, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    return model(ids, use_cache=False, **kw).logits.float()


def _rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _constants(out: Path) -> dict[str, Any]:
    """The IR's Constant nodes by name, read back from the files."""
    model = ov.Core().read_model(out / XML_FILE)
    return {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}


def _unpack(const: Any) -> np.ndarray:
    """Integer values of a u2/u4/i4/u8/i8 Constant, in its shape (sub-byte fields lowest bits first)."""
    kind = const.get_element_type().to_string()
    shape = tuple(const.get_output_shape(0))
    raw = np.asarray(const.get_data()).reshape(-1).view(np.uint8)
    bits = {"u2": 2, "u4": 4, "i4": 4, "u8": 8, "i8": 8}[kind]
    fields = ((raw[:, None] >> np.arange(0, 8, bits, dtype=np.uint8)) & ((1 << bits) - 1)).reshape(-1).astype(np.int64)
    fields = fields[: int(np.prod(shape, dtype=np.int64))]
    if kind.startswith("i"):
        fields = np.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields)
    return fields.reshape(shape)


def _float_values(const: Any) -> torch.Tensor:
    """A float Constant's values as a torch tensor of its own type (16-bit patterns kept)."""
    kind = const.get_element_type().to_string()
    data = np.asarray(const.get_data())
    if kind in ("f16", "bf16"):
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.float16 if kind == "f16" else torch.bfloat16)
    return torch.from_numpy(data.copy())


# -- 1. OpenVINO logits = frugal's model ---------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_openvino_logits_match_frugal_model(exported, case):
    e = exported(case)
    ids = _ids()
    ref = _torch_logits(e.result.model, ids)
    got = e.lm.logits(ids)
    assert got.shape == ref.shape == (1, SEQ, 512)
    assert _rel_diff(got, ref) < REL_TOL, f"{case.id}: max |d| = {(got - ref).abs().max():.3g}"


# -- 2. stateful KV cache -----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama-w4-g64-asym", "mistral-w4-g32-sym", "gemma3-w4-g32-sym-float16"])
def test_incremental_decoding_matches_full_forward(exported, case):
    """Prompt of 24, a chunk of 4, then 12 tokens one at a time (past both sliding windows)."""
    lm = exported(CASE[case]).lm
    ids = _ids(40, seed=2).numpy()
    full = lm.logits(ids).numpy()
    lm.reset()
    pieces = [lm.step(ids[:, :24])]
    pieces += [lm.step(ids[:, a:b]) for a, b in [(24, 28), *((t, t + 1) for t in range(28, 40))]]
    stepped = np.concatenate(pieces, axis=1)
    assert np.abs(stepped - full).max() / np.abs(full).max() < REL_TOL


@pytest.mark.parametrize("case", ["llama-w4-g64-asym", "gemma3-w4-g32-sym-float16"])
def test_generate_greedy_matches_full_sequence_argmax_and_transformers(exported, case):
    e = exported(CASE[case])
    prompt = _ids(12, seed=3)
    got = e.lm.generate_greedy(prompt, 10)
    assert got.shape == (1, 22) and torch.equal(got[:, :12], prompt)
    full = e.lm.logits(got).argmax(-1)  # every generated token is the argmax of one full forward
    assert torch.equal(full[:, 11:-1], got[:, 12:])
    with torch.no_grad():
        ref = e.result.model.generate(prompt, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(got[:, :ref.shape[1]], ref)  # transformers stops at EOS


def test_left_padding_and_beam_idx(exported):
    """Two rows, the second left-padded by 5, match transformers given the same mask and positions;
    beam_idx = [1, 1] then continues row 1 in both rows of the cache."""
    e = exported(CASE["gemma3-w4-g32-sym-float16"])
    ids = torch.cat([_ids(30), torch.cat([torch.zeros(1, 5, dtype=torch.long), _ids(25, seed=5)], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    req = e.lm.request
    req.reset_state()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
             "beam_idx": np.arange(2, dtype=np.int32)}
    got = torch.from_numpy(req.infer(feeds)["logits"].copy())
    ref = _torch_logits(e.result.model, ids, attention_mask=mask, position_ids=pos)
    assert _rel_diff(got[0], ref[0]) < REL_TOL and _rel_diff(got[1, 5:], ref[1, 5:]) < REL_TOL
    nxt = torch.full((2, 1), 7)
    feeds = {"input_ids": nxt.numpy(), "attention_mask": torch.cat([mask[[1, 1]], torch.ones(2, 1, dtype=torch.long)], 1).numpy(),
             "position_ids": (pos[[1, 1], -1:] + 1).numpy(), "beam_idx": np.array([1, 1], dtype=np.int32)}
    step = torch.from_numpy(req.infer(feeds)["logits"].copy())
    row1 = _torch_logits(e.result.model, torch.cat([ids[1:, 5:], nxt[:1]], 1))[:, -1]
    assert _rel_diff(step[0], row1) < REL_TOL and torch.equal(step[0], step[1])


# -- 3. the IR holds frugal's integers exactly and the plugin runs them compressed ---------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ir_holds_frugal_integers_exactly(exported, case):
    e = exported(case)
    consts = _constants(e.out)
    modules = dict(e.result.model.named_modules())
    assert e.result.quantized
    for name, qw in e.result.quantized.items():
        codes = consts[f"{name}.weight"]
        kind = codes.get_element_type().to_string()
        signed = qw.zero_point is None and qw.bits != 2
        assert kind == {2: "u2", 3: "u4" if not signed else "i4", 4: "u4" if not signed else "i4",
                        8: "u8" if not signed else "i8"}[qw.bits], name
        n, k = qw.q.shape
        groups = qw.scale.shape[1]
        q, offset = _unpack(codes).reshape(n, k), 0 if signed else 1 << (qw.bits - 1)
        assert np.array_equal(q - offset, qw.q.numpy()), name
        zero = f"{name}.zero_point"
        if signed:
            z = np.zeros((n, groups), np.int64)
            assert zero not in consts
        else:
            zu = _unpack(consts[zero])  # (out, n_groups, 1), (out, 1), or one scalar for symmetric u2
            z = (np.full((n, groups), zu.item()) if zu.ndim == 0 else zu.reshape(n, groups)) - offset
            expected = np.zeros_like(z) if qw.zero_point is None else qw.zero_point.numpy()
            assert np.array_equal(z, expected), name
        s = _float_values(consts[f"{name}.scale"]).reshape(n, groups)
        assert s.dtype == qw.scale.dtype or torch.equal(s.to(qw.scale.dtype), qw.scale), name  # f16 stays f16
        assert torch.equal(s.float(), qw.scale.float()), name
        # ... so the weight OpenVINO decompresses, (u - z_u) * s in float32, is frugal's weight bit for bit
        gs = k // groups
        dq = (q - offset - np.repeat(z, gs, axis=1)).astype(np.float32) * np.repeat(s.float().numpy(), gs, axis=1)
        assert np.array_equal(dq, modules[name].weight.detach().numpy()), name


@pytest.mark.parametrize("case", ["llama-w4-g64-asym", "llama-w4-g-1-sym", "llama-w8-g32-asym", "llama-w8-g-1-sym",
                                  "llama-w2-g32-sym", "llama-w4-g32-sym-bfloat16-lm_head"])
def test_cpu_plugin_runs_compressed_fully_connected(exported, case):
    """The runtime model has one FullyConnected on integer weights per quantized layer, no float one
    except an unquantized lm_head, and the attention is the plugin's stateful SDPA (the KV concat is fused)."""
    e = exported(CASE[case])
    ops = [(o.get_rt_info()["layerType"].astype(str), o.get_rt_info()["runtimePrecision"].astype(str))
           for o in e.lm.compiled.get_runtime_model().get_ordered_ops()]
    fc = [p for t, p in ops if t == "FullyConnected"]
    head_float = "lm_head" not in e.result.quantized
    assert sum(p in KINDS for p in fc) == len(e.result.quantized) and len(fc) == len(e.result.quantized) + head_float
    assert sum(t == "ScaledDotProductAttention" for t, _ in ops) == e.result.model.config.num_hidden_layers
    assert sum(t == "Concatenation" and p == "f32" for t, p in ops) == 2  # rotary halves; KV concats are in SDPA


def test_float_weights_exact_tied_embedding_stored_once(exported):
    e = exported(CASE["gemma3-w4-g32-sym-float16"])  # Gemma 3 ties lm_head to the embedding
    consts = _constants(e.out)
    model = e.result.model
    floats = {n: p.detach() for n, p in model.named_parameters() if not n.endswith("proj.weight")}
    assert floats and set(floats) <= set(consts) | {"lm_head.weight"}
    for name, p in floats.items():  # Gemma's norms are stored as (1 + w), computed in float32
        v = _float_values(consts[name]).float()
        assert torch.equal(v, p.float() + 1.0 if name.endswith("norm.weight") else p.float()), name
    emb = model.get_input_embeddings().weight.detach()
    assert model.lm_head.weight.data_ptr() == emb.data_ptr() and "lm_head.weight" not in consts
    assert sum(int(np.prod(c.get_output_shape(0))) == emb.numel() for c in consts.values()) == 1
    assert all(c.get_element_type().to_string() != "f32" or c.get_output_shape(0) != list(emb.shape)
               for c in consts.values())  # bf16-rounded values are stored in 16 bits


# -- 4. determinism, CLI ------------------------------------------------------------------------
def test_writing_twice_gives_identical_files(exported, tmp_path):
    e = exported(CASE["llama-w4-g64-asym"])
    again = e.result.save(tmp_path / "again", fmt="openvino")
    digest = dir_digest(e.out)
    assert digest == dir_digest(again)
    assert {XML_FILE, "openvino_model.bin", "config.json", "frugal.json", "tokenizer.json"} <= set(digest)


def test_cli_export(exported, tmp_path, capsys):
    """`frugal export CT --format openvino -o OUT` on a compressed-tensors directory (the command's own
    parser and dispatch, in this process): the IR gives the logits of the model frugal reads back."""
    from frugal.cli.main import main
    from frugal.exporters.reload import load_compressed

    e = exported(CASE["llama-w4-g64-asym"])
    ct = e.result.save(tmp_path / "ct")
    out = tmp_path / "ir"
    assert main(["export", str(ct), "--format", "openvino", "-o", str(out)]) == 0
    assert "openvino" in capsys.readouterr().out and (out / XML_FILE).is_file()
    ids = _ids()
    ref = _torch_logits(load_compressed(ct).model, ids)
    assert _rel_diff(OvCausalLM(out).logits(ids), ref) < REL_TOL
    assert main(["export", str(ct), "--format", "openvino", "-o", str(out)]) == 2  # exists: refused, one line
    err = capsys.readouterr().err
    assert err.startswith("frugal: error: ") and err.strip().count("\n") == 0


# -- 5. refusals before any work -----------------------------------------------------------------
def _model(family: str, tmp_path: Path, **config: Any):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(build_tiny_model(family, tmp_path / family, **config))


@pytest.mark.parametrize("family, config, recipe, message", [
    ("opt", {}, {}, "architecture 'opt' is not supported (supported: gemma3_text, llama, mistral, qwen2, qwen3)"),
    ("phi3", {}, {}, "architecture 'phi3' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, {},
     "rope_type 'dynamic'"),
    ("llama", {}, {"method": "rtn", "gguf_type": "Q4_0"}, "which only --format gguf can hold"),
])
def test_check_refuses_with_one_line(tmp_path, family, config, recipe, message):
    from frugal.config import Recipe
    from frugal.exporters import check

    model = _model(family, tmp_path, **config)
    with pytest.raises(FrugalError) as err:
        check("openvino", model, Recipe.from_dict(recipe))
    text = str(err.value)
    assert text.startswith("--format openvino: ") and message in text and "\n" not in text


def test_every_frugal_bit_width_has_a_container_and_others_are_refused():
    from frugal.exporters.openvino import HELD_BITS
    from frugal.exporters.openvino_weights import CONTAINERS, container_of
    from frugal.quant.grid import QuantizedWeight
    from frugal.quant.options import SUPPORTED_BITS

    assert set(SUPPORTED_BITS) == set(HELD_BITS) == set(CONTAINERS)
    qw = QuantizedWeight(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1), None, bits=5, group_size=-1)
    with pytest.raises(FrugalError, match=r"^--format openvino: 5-bit codes are not supported \(supported: 2, 3, 4, 8"):
        container_of(qw)


def test_check_accepts_supported_families(tmp_path):
    from frugal.config import Recipe
    from frugal.exporters import check

    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3"):
        check("openvino", _model(family, tmp_path), Recipe.from_dict({"weights": w(2, -1)}))
