"""`--format onnx` on tiny random models: ONNX Runtime computes what frugal's in-memory model
computes, decoding with the KV cache matches one full forward, the file holds frugal's codes, scales
and zero points bit for bit, output bytes are deterministic, and unsupported models are refused early."""

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

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from frugal.exporters.onnx_runtime import OrtCausalLM  # noqa: E402

# Tiny Qwen3 (q_norm/k_norm per head), shaped like conftest's other families.
# ORT and torch sum in different orders; frugal's weights are reproduced exactly, so the logits
# differ by float32 rounding only. Bound: 1e-5 of the largest logit (observed: below 1e-6).
REL_TOL = 1e-5
SEQ = 48  # longer than Mistral's (32) and Gemma 3's (16) sliding windows


@dataclass(frozen=True)
class Case:
    family: str
    weights: dict
    method: str = "rtn"
    ignore: tuple = ("lm_head",)
    config: dict = field(default_factory=dict)
    tag: str = ""

    @property
    def id(self) -> str:
        w = self.weights
        parts = [self.family, self.method, f"w{w['bits']}", f"g{w['group_size']}",
                 "sym" if w.get("symmetric", True) else "asym", w.get("scale_dtype", ""),
                 "lm_head" if not self.ignore else "", self.tag]
        return "-".join(p for p in parts if p)


def w(bits: int, group: int, symmetric: bool = True, **more: Any) -> dict:
    return {"bits": bits, "group_size": group, "symmetric": symmetric, **more}


CASES = [
    Case("llama", w(4, 32)),
    Case("llama", w(4, 64, False)),
    Case("llama", w(8, 32)),
    Case("llama", w(3, 64, False)),
    Case("llama", w(2, 32)),
    Case("llama", w(4, -1)),
    Case("llama", w(4, 32, scale_dtype="bfloat16"), ignore=()),  # quantized lm_head, bf16 scales
    Case("llama", w(4, 32), config={"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
         tag="rope-linear"),
    Case("llama", w(4, 64), config={"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32}},
         tag="rope-llama3"),
    Case("mistral", w(4, 32)),
    Case("mistral", w(8, -1, False)),
    Case("qwen2", w(4, 32, False)),  # q/k/v biases
    Case("qwen2", w(3, -1, False)),
    Case("qwen3", w(4, 64)),
    Case("qwen3", w(4, 32, False), method="gptq"),
    Case("gemma3", w(4, 32, scale_dtype="float16")),  # tied embeddings, sandwich norms, gelu-tanh
    Case("gemma3", w(2, -1, False)),
]
CASE = {c.id: c for c in CASES}


@dataclass
class Exported:
    case: Case
    result: Any  # frugal.compression.result.Compressed
    out: Path
    lm: OrtCausalLM


def _tiny(family: str, dest: Path, **config: Any) -> Path:
    """A 256-token context: the graph's rotary tables (max_position_embeddings rows) stay small beside
    the embedding the size checks compare with."""
    return build_tiny_model(family, dest, **{"max_position_embeddings": 256, **config})


def _export(case: Case, root: Path) -> Exported:
    src = _tiny(case.family, root / "src", **case.config)
    recipe = {"method": case.method, "weights": case.weights, "ignore": list(case.ignore), "seed": 0,
              "calibration": {"num_samples": 4, "seq_len": 32}}
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    result = frugal.compress(src, recipe, calibration=calib if case.method == "gptq" else None)
    out = result.save(root / "onnx", fmt="onnx")
    return Exported(case, result, out, OrtCausalLM(out))


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
def _torch_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits.float()


def _rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


# -- 1. ONNX Runtime logits = frugal's model ------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ort_logits_match_frugal_model(exported, case):
    e = exported(case)
    ids = _ids()
    ref = _torch_logits(e.result.model, ids)
    got = e.lm.logits(ids)
    assert got.shape == ref.shape == (1, SEQ, 512)
    assert _rel_diff(got, ref) < REL_TOL, f"{case.id}: max |d| = {(got - ref).abs().max():.3g}"


def test_sliding_window_matters_for_mistral(exported):
    """The Mistral case would pass without a window only if the window had no effect: it has."""
    e = exported(CASE["mistral-rtn-w4-g32-sym"])
    model = e.result.model
    ids = _ids()
    window = model.config.sliding_window
    assert window < SEQ
    windowed = _torch_logits(model, ids)
    model.config.sliding_window = None
    try:
        full = _torch_logits(model, ids)
    finally:
        model.config.sliding_window = window
    assert (windowed - full)[:, window:].abs().max() > 1e-3 and (windowed - full)[:, :window].abs().max() == 0


# -- 2. KV cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama-rtn-w4-g32-sym", "mistral-rtn-w4-g32-sym", "qwen3-rtn-w4-g64-sym",
                                  "gemma3-rtn-w4-g32-sym-float16"])
def test_incremental_decoding_matches_full_forward(exported, case):
    """Prompt of 24, a chunk of 4, then 12 tokens one at a time (past both sliding windows)."""
    lm = exported(CASE[case]).lm
    ids = _ids(40, seed=2).numpy()
    full = lm.logits(ids).numpy()
    logits, past = lm.step(ids[:, :24], lm.empty_past(1))
    pieces = [logits]
    for start, stop in [(24, 28), *((t, t + 1) for t in range(28, 40))]:
        logits, past = lm.step(ids[:, start:stop], past)
        pieces.append(logits)
    assert next(iter(past.values())).shape[2] == 40
    stepped = np.concatenate(pieces, axis=1)
    assert np.abs(stepped - full).max() / np.abs(full).max() < REL_TOL


def test_batch_with_left_padding_matches_transformers(exported):
    """Two rows, the second left-padded by 5: every real position matches transformers given the
    same mask and position ids, and the padded row matches that row run alone."""
    e = exported(CASE["gemma3-rtn-w4-g32-sym-float16"])  # Gemma 3: sliding and full layers
    ids = torch.cat([_ids(30), torch.cat([torch.zeros(1, 5, dtype=torch.long), _ids(25, seed=5)], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
             **e.lm.empty_past(2)}
    got = torch.from_numpy(e.lm.session.run(["logits"], feeds)[0])
    with torch.no_grad():
        ref = e.result.model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert _rel_diff(got[0], ref[0]) < REL_TOL and _rel_diff(got[1, 5:], ref[1, 5:]) < REL_TOL
    assert _rel_diff(got[1, 5:], e.lm.logits(ids[1:, 5:])[0]) < REL_TOL


def test_generate_greedy_matches_transformers(exported):
    e = exported(CASE["gemma3-rtn-w4-g32-sym-float16"])  # Gemma 3: generation crosses the 16-token window
    prompt = _ids(12, seed=3)
    got = e.lm.generate_greedy(prompt, 10)
    with torch.no_grad():
        ref = e.result.model.generate(prompt, max_new_tokens=10, do_sample=False,
                                      attention_mask=torch.ones_like(prompt))
    assert got.shape == (1, 22)
    assert torch.equal(got, ref)


# -- 3. exact round trip of the stored integers --------------------------------------------------
def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """(..., L) bytes -> (..., L * 8 / bits) codes, lowest bits first."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1).astype(np.int64)


def _nbits_nodes(model) -> dict[str, Any]:
    return {n.input[1].removesuffix(".B"): {a.name: a.i for a in n.attribute}
            for n in model.graph.node if n.op_type == "MatMulNBits"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_file_holds_frugal_integers_exactly(exported, case):
    from onnx import numpy_helper

    e = exported(case)
    model = onnx.load(str(e.out / "model.onnx"))  # reads model.onnx.data
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = _nbits_nodes(model)
    assert sorted(nodes) == sorted(e.result.quantized)
    modules = dict(e.result.model.named_modules())
    for name, qw in e.result.quantized.items():
        attrs, (n, k) = nodes[name], qw.q.shape
        bits, block = attrs["bits"], attrs["block_size"]
        assert (attrs["N"], attrs["K"]) == (n, k) and bits == {3: 4}.get(qw.bits, qw.bits)
        assert block == (qw.group_size if qw.group_size != -1 else max(b for b in (16, 32, 64, 128, 256) if k % b == 0))
        offset, n_blocks = 1 << (qw.bits - 1), k // block
        codes = _unpack(inits[f"{name}.B"].reshape(n, -1), bits) - offset  # (N, K)
        zeros = _unpack(inits[f"{name}.zero_points"], bits)[:, :n_blocks] - offset  # (N, n_blocks)
        scales = inits[f"{name}.scales"]  # (N, n_blocks) float32
        groups = qw.scale.shape[1]
        assert np.array_equal(codes, qw.q.numpy()), name
        assert np.all(zeros.reshape(n, groups, -1) == zeros.reshape(n, groups, -1)[..., :1]), name
        assert np.all(scales.reshape(n, groups, -1) == scales.reshape(n, groups, -1)[..., :1]), name
        z = zeros.reshape(n, groups, -1)[..., 0]
        s = torch.from_numpy(scales.reshape(n, groups, -1)[..., 0].copy())
        assert np.array_equal(z, np.zeros_like(z) if qw.zero_point is None else qw.zero_point.numpy()), name
        assert torch.equal(s.to(qw.scale.dtype), qw.scale) and torch.equal(s, qw.scale.float()), name
        # ... so the weight ORT dequantizes, (u - z_u) * s, is frugal's in-memory weight bit for bit
        dq = (codes - np.repeat(zeros, block, axis=1)).astype(np.float32) * np.repeat(scales, block, axis=1)
        assert np.array_equal(dq, modules[name].weight.detach().numpy()), name


def test_float_weights_exact_tied_embedding_stored_once(exported):
    from onnx import numpy_helper

    e = exported(CASE["gemma3-rtn-w4-g32-sym-float16"])  # Gemma 3 ties lm_head to the embedding
    onnx.checker.check_model(str(e.out / "model.onnx"), full_check=True)
    model = onnx.load(str(e.out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    floats = {n: p.detach() for n, p in e.result.model.named_parameters() if not n.endswith("proj.weight")}
    assert floats and set(floats) <= set(inits) | {"lm_head.weight"}
    for name, p in floats.items():
        if name in inits:  # Gemma's norms are stored as (1 + w), computed in float32 as transformers does
            assert np.array_equal(inits[name], (p + 1.0 if name.endswith("norm.weight") else p).numpy()), name
    emb = e.result.model.get_input_embeddings().weight.detach()
    assert e.result.model.lm_head.weight.data_ptr() == emb.data_ptr()
    assert np.array_equal(inits["model.embed_tokens.weight"], emb.numpy())
    assert not any(n.startswith("lm_head") for n in inits)
    assert sum(a.size == emb.numel() for a in inits.values()) == 1
    size = (e.out / "model.onnx.data").stat().st_size
    assert size < 2 * emb.numel() * 4  # one float copy of the embedding plus the small rest, not two
    assert (e.out / "model.onnx").stat().st_size < 200_000  # weights live in model.onnx.data


# -- 4. determinism -------------------------------------------------------------------------------
def test_writing_twice_gives_identical_files(exported, tmp_path):
    e = exported(CASE["llama-rtn-w4-g64-asym"])
    again = e.result.save(tmp_path / "again", fmt="onnx")
    digest = dir_digest(e.out)
    assert digest == dir_digest(again)
    assert {"model.onnx", "model.onnx.data", "config.json", "frugal.json", "tokenizer.json"} <= set(digest)


# -- 5. refusals before any work ------------------------------------------------------------------
def _model(family: str, tmp_path: Path, **config: Any):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_tiny(family, tmp_path / family, **config))


@pytest.mark.parametrize("family, config, recipe, message", [
    ("opt", {}, {}, "architecture 'opt' is not supported (supported: gemma3_text, llama, mistral, qwen2, qwen3)"),
    ("phi3", {}, {}, "architecture 'phi3' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, {},
     "rope_type 'dynamic'"),
    ("llama", {"hidden_size": 40, "intermediate_size": 72, "head_dim": 10}, {"weights": w(4, -1)},
     "in_features 40 is not a multiple of 16"),
])
def test_check_refuses_with_one_line(tmp_path, family, config, recipe, message):
    from frugal.config import Recipe
    from frugal.exporters import check

    model = _model(family, tmp_path, **config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FrugalError) as err:
        check("onnx", model, Recipe.from_dict(recipe))
    text = str(err.value)
    assert text.startswith("--format onnx: ") and message in text and "\n" not in text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_check_accepts_supported_families(tmp_path):
    from frugal.config import Recipe
    from frugal.exporters import check

    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3"):
        check("onnx", _model(family, tmp_path), Recipe.from_dict({"weights": w(4, -1)}))
