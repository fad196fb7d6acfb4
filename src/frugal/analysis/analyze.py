"""Per-layer sensitivity: the damage of quantizing one layer alone, measured and predicted.

For every quantizable layer L and candidate format F:
  * proxy   P(L, F) = tr(dW H dW^T) / n, the change of the layer's output on the calibration inputs
            (H = 2/n X^T X, dW = Q_F(W) - W): cheap, computed for every pair;
  * measured KL(L, F) = mean over calibration tokens of KL(p_original || p_with-L-quantized): one
            forward of the blocks from L's block onward (earlier blocks' outputs are cached) per pair,
            so it is measured only for the `measure` formats: the first on every layer, the others on
            every `check_every`-th layer.
Each layer's downstream amplification c_L = KL(L, F0) / P(L, F0) is fitted on the first measured
format F0 and predicts KL(L, F) = c_L * P(L, F) for the others; the rank correlation (Spearman) of
that prediction against the measurement on the other measured formats says whether the proxy can be
trusted. Allocation (frugal.analysis.allocate) uses measured KL where there is one, the prediction elsewhere.

A method whose registry record needs Hessians (`method="gptq"`) measures what the compression will
do: integer and GGML candidates are rounded by GPTQ with the layer's Hessian (from `hessian_samples`, the compression's own calibration, when given,
so that GPTQ is not fitted to the tokens the KL is measured on), not to nearest. GPTQ repairs low-bit
grids more than high-bit ones, so RTN damage misallocates bits for a GPTQ compression.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from frugal.config import WeightScheme
from frugal.compression import methods
from frugal.errors import FrugalError
from frugal.families import final_modules

log = logging.getLogger(__name__)
ANALYSIS_VERSION = 2  # 2: routed share of MoE experts
# final norm (and projection) before the output head, of every family (FamilyRecord.final)
FINAL = final_modules()


@dataclass(frozen=True)
class Candidate:
    """A weight format a layer could get: an integer grid or a simulated float format."""

    name: str  # e.g. int4g64, int8g-1, fp8_e4m3, mxfp4, Q4_K
    scheme: WeightScheme | None = None  # integer grids
    float_fmt: str = ""  # frugal.quant.floats formats
    ggml: str = ""  # GGML block types (GGUF targets)

    def quantize(self, w: torch.Tensor, h: torch.Tensor | None = None, gptq: Any = None) -> torch.Tensor:
        """The dequantized weight: by GPTQ with Hessian `h` and options `gptq` when both are given (integer
        and GGML candidates), else rounded to nearest."""
        if gptq is not None and h is not None and (self.scheme is not None or self.ggml):
            from frugal.quant.gptq import gptq_ggml, gptq_quantize

            if self.ggml:
                return gptq_ggml(w, h, self.ggml, gptq).weight.dequantize(w.dtype)
            return gptq_quantize(w, h, self.scheme, gptq, None, torch.float16).weight.dequantize(w.dtype)
        return self.fake_quantize(w)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.scheme is not None:
            from frugal.quant.rtn import rtn_quantize

            return rtn_quantize(w, self.scheme, scale_dtype=torch.float16).dequantize(w.dtype)
        if self.ggml:
            from frugal.quant.ggml import make_grid

            return make_grid(w, self.ggml, shrinks=[1.0, 0.9, 0.8]).dequantize(w.dtype)  # coarse search: a proxy
        from frugal.quant.floats import fake_quantize

        return fake_quantize(w, self.float_fmt).to(w.dtype)

    def nbytes(self, out_f: int, in_f: int) -> int:
        """Stored bytes of an (out, in) weight: codes plus fp16 scales (and zero points)."""
        from frugal.quant import sizes

        if self.scheme is not None:
            s = self.scheme
            return sizes.packed_bytes(out_f, in_f, s.bits, s.group_size, s.symmetric, 2, layout="dense")
        if self.ggml:
            return sizes.ggml_bytes(self.ggml, out_f, in_f)
        return sizes.float_format_bytes(self.float_fmt, out_f, in_f)


def parse_candidate(text: str) -> Candidate:
    """`int4g64`, `int3g32a` (asymmetric), `int8g-1` (per channel), or a float format name."""
    import re

    m = re.fullmatch(r"int([2348])g(-1|32|64|128)(a?)", text)
    if m:
        return Candidate(text, WeightScheme(int(m[1]), int(m[2]), symmetric=not m[3], scale_dtype="float16"))
    from frugal.quant.floats import FLOAT_FORMATS
    from frugal.quant.ggml import TYPES

    if text in FLOAT_FORMATS:
        return Candidate(text, float_fmt=text)
    if text in TYPES:
        return Candidate(text, ggml=text)
    raise FrugalError(f"format {text!r}: use intBgG (B in 2,3,4,8; G in 32,64,128,-1; suffix 'a' for "
                      f"asymmetric), a float format ({', '.join(FLOAT_FORMATS)}) or a GGML type ({', '.join(TYPES)})")


@dataclass
class LayerSensitivity:
    name: str
    shape: tuple[int, int]
    bytes: dict[str, int] = field(default_factory=dict)  # candidate -> stored bytes
    proxy: dict[str, float] = field(default_factory=dict)  # candidate -> tr(dW H dW^T) / n
    kl: dict[str, float] = field(default_factory=dict)  # candidate -> measured KL (nats/token)
    amplification: float | None = None  # c_L
    routed: float | None = None  # MoE expert layers: the share of the calibration tokens routed to it

    def damage(self, cand: str) -> float:
        """Measured KL if there is one, else c_L * proxy."""
        if cand in self.kl:
            return self.kl[cand]
        return (self.amplification or 0.0) * self.proxy[cand]


def _head(model: nn.Module):
    """logits = head(last block output): the family's final norm (data table FINAL), the output
    embedding, and Gemma-style final soft-capping."""
    mods = dict(model.named_modules())
    parts = [mods[n] for n in FINAL if n in mods]
    out = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                  "final_logit_softcapping", None)

    def head(x: torch.Tensor) -> torch.Tensor:
        for p in parts:
            x = p(x)
        logits = out(x)
        return logits if not cap else torch.tanh(logits / cap) * cap
    return head


class TailRunner:
    """The original model's inputs of every block on the calibration samples, cached, so that the model
    from block b onward can be re-run with one layer changed; also the Hessian of every layer."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, samples: torch.Tensor, layers: dict[str, nn.Linear]):
        from frugal.load.blocks import find_blocks
        from frugal.compression.hooks import HessianHooks, capture_block_inputs, run_block

        self.run_block = run_block
        _, self.blocks = find_blocks(model)
        cap = capture_block_inputs(model, self.blocks, samples)
        self.args, self.kwargs = cap.args, cap.kwargs_per_block
        self.inputs = [cap.hidden]  # inputs[b][s]: input of block b for sample s; inputs[-1]: final hidden
        with HessianHooks(layers) as hooks:
            for i, b in enumerate(tqdm(self.blocks, desc="analyze: cache", unit="block")):
                outs = []
                for x in self.inputs[-1]:
                    outs.append(run_block(b, x, self.args, self.kwargs[i]))
                    hooks.end_sample()
                self.inputs.append(outs)
        self.hessians = layer_hessians(hooks.hessians, layers)
        self.tokens = {n: hooks.hessians[n].n if n in hooks.hessians else 0 for n in layers}  # rows each layer saw
        del hooks
        self.head = _head(model)
        self.ref = [F.log_softmax(self.head(x)[0].float(), dim=-1) for x in self.inputs[-1]]  # (L, V) each
        full = F.log_softmax(model(samples[:1], use_cache=False).logits[0].float(), dim=-1)
        if not torch.allclose(full, self.ref[0], atol=1e-3):
            raise FrugalError("analyze: re-running the blocks does not reproduce the model's logits for this "
                              "architecture (its final norm/head is not in frugal.analysis.analyze.FINAL)")

    @torch.no_grad()
    def kl_from(self, b: int) -> float:
        """Mean KL(original || current model) per token, re-running blocks b.. on cached inputs."""
        from frugal.evaluation.divergence import kl_sum

        total, count = 0.0, 0
        for s, x in enumerate(self.inputs[b]):
            for i in range(b, len(self.blocks)):
                x = self.run_block(self.blocks[i], x, self.args, self.kwargs[i])
            lp = F.log_softmax(self.head(x)[0].float(), dim=-1)
            total += kl_sum(self.ref[s], lp)
            count += lp.shape[0]
        return max(total / count, 0.0)  # float32 round-off can make a tiny KL negative


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two equally long lists (average ranks for ties are not needed here)."""
    if len(a) < 3:
        return float("nan")
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


@dataclass
class Analysis:
    version: int
    candidates: list[str]
    measured: list[str]
    layers: list[LayerSensitivity]
    spearman: dict[str, float]  # measured format (other than the fitted one) -> rho(predicted, measured)
    seconds: dict[str, float]
    calibration: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for l in d["layers"]:
            l["shape"] = list(l["shape"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Analysis":
        layers = [LayerSensitivity(**{**l, "shape": tuple(l["shape"])}) for l in d["layers"]]
        return cls(**{**d, "layers": layers})


def _fits(c: Candidate, in_f: int) -> bool:
    if c.scheme is not None:
        return c.scheme.group_size == -1 or in_f % c.scheme.group_size == 0
    if c.ggml:
        from frugal.quant.ggml import TYPES

        return in_f % TYPES[c.ggml].block == 0
    from frugal.quant.floats import FLOAT_FORMATS

    block = FLOAT_FORMATS[c.float_fmt].block_size
    return not block or in_f % block == 0


def _amplify(layers: list[LayerSensitivity], fit_on: str) -> None:
    """c_L = KL / proxy on the fitted format (0 when the proxy is 0)."""
    for ls in layers:
        p, k = ls.proxy.get(fit_on), ls.kl.get(fit_on)
        if p is not None and k is not None:
            ls.amplification = k / p if p > 0 else 0.0


def _agreement(layers: list[LayerSensitivity], measured: list[str]) -> dict[str, float]:
    """Spearman of predicted (c_L * proxy) against measured KL, for each measured format but the first."""
    out = {}
    for m in measured[1:]:
        rows = [ls for ls in layers if m in ls.kl and ls.amplification is not None]
        out[m] = spearman([ls.amplification * ls.proxy[m] for ls in rows], [ls.kl[m] for ls in rows])
    return out


@torch.no_grad()
def analyze(model: nn.Module, samples: torch.Tensor, candidates: list[str], measure: list[str],
            ignore: tuple[str, ...] = ("lm_head",), check_every: int = 4, method: str = "rtn",
            hessian_samples: torch.Tensor | None = None, gptq: Any = None) -> Analysis:
    """Proxy for every (layer, candidate); measured KL for measure[0] on every layer (it fits c_L) and
    for the other `measure` candidates on every `check_every`-th layer (they check the prediction).
    A `method` whose registry record needs Hessians (gptq) quantizes the candidates with GPTQ (options
    `gptq`, Hessians from `hessian_samples` when given, else from `samples`); others round to nearest."""
    from frugal.load.blocks import block_linears, find_blocks

    cands = {c: parse_candidate(c) for c in candidates}
    missing = [m for m in measure if m not in cands]
    if missing or not measure:
        raise FrugalError(f"--measure {','.join(missing) or '(empty)'}: measured formats must be among the candidates")
    blocks_name, blocks = find_blocks(model)
    per_block = [block_linears(b, f"{blocks_name}.{i}", ignore) for i, b in enumerate(blocks)]
    t0 = time.perf_counter()
    all_layers = {n: l for d in per_block for n, l in d.items()}
    runner = TailRunner(model, samples, all_layers)
    hessian_aware = methods.get(method, "analyze: method").needs_hessian
    if hessian_aware:
        from frugal.config import GPTQOptions

        gptq = gptq or GPTQOptions()
        if hessian_samples is not None:
            runner.hessians = model_hessians(model, hessian_samples, all_layers)
    t1 = time.perf_counter()
    layers: list[LayerSensitivity] = []
    bar = tqdm(total=sum(len(d) for d in per_block), desc="analyze: layers", unit="layer")
    for b, d in enumerate(per_block):
        for name, lin in d.items():
            check = len(layers) % check_every == 0
            layers.append(_one_layer(name, lin, cands, measure if check else measure[:1], runner, b,
                                     gptq if hessian_aware else None))
            bar.update()
    bar.close()
    _routed_shares(model, layers, runner.tokens, samples.numel())
    _amplify(layers, measure[0])
    seconds = {"cache_and_hessians": t1 - t0, "layers": time.perf_counter() - t1}
    calib = {"num_samples": samples.shape[0], "seq_len": samples.shape[1], "check_every": check_every,
             "method": method}
    if hessian_samples is not None and hessian_aware:
        calib["hessian_samples"] = list(hessian_samples.shape)
    return Analysis(ANALYSIS_VERSION, list(cands), list(measure), layers, _agreement(layers, measure), seconds,
                    calib)


def _routed_shares(model: nn.Module, layers: list[LayerSensitivity], tokens: dict[str, int], total: int) -> None:
    """Each MoE expert layer's share of the calibration tokens (the rows its hook saw over all tokens)."""
    from frugal.load.experts import expert_groups, is_expert_layer

    groups = expert_groups(model)
    for ls in layers:
        if groups and is_expert_layer(ls.name, groups) is not None:
            ls.routed = tokens.get(ls.name, 0) / max(total, 1)


@torch.no_grad()
def model_hessians(model: nn.Module, samples: torch.Tensor, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of every layer's inputs in the original model over (n, seq) token ids."""
    from frugal.compression.hooks import HessianHooks

    with HessianHooks(layers) as hooks:
        for i in tqdm(range(samples.shape[0]), desc="analyze: hessians", unit="sample"):
            model(samples[i : i + 1], use_cache=False)
            hooks.end_sample()
    return layer_hessians(hooks.hessians, layers)


def layer_hessians(accs: dict, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Each layer's H; zero for a layer no analysis token reached (a MoE expert the router never picked
    here): rounding it changes nothing on these tokens, which is what its proxy then says."""
    return {n: accs[n].matrix() if n in accs and accs[n].n else
            torch.zeros(lin.in_features, lin.in_features, device=lin.weight.device) for n, lin in layers.items()}


def _one_layer(name, lin, cands, measure, runner: TailRunner, b: int, gptq=None) -> LayerSensitivity:
    w = lin.weight.data.clone()
    h = runner.hessians[name]
    ls = LayerSensitivity(name, tuple(w.shape))
    for cname, c in cands.items():
        if not _fits(c, w.shape[1]):
            continue
        wq = c.quantize(w, h, gptq)
        dw = (wq - w).float()
        ls.proxy[cname] = float(torch.einsum("oi,ij,oj->", dw, h, dw))
        ls.bytes[cname] = c.nbytes(*w.shape)
        if cname in measure:
            lin.weight.data = wq
            try:
                ls.kl[cname] = runner.kl_from(b)
            finally:
                lin.weight.data = w
    return ls


def source_identity(path) -> str:
    """Name, size and modification time of a model's weight files: changes when the model does."""
    from pathlib import Path

    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".gguf", ".json"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def cached_analyze(model: nn.Module, source, samples: torch.Tensor, candidates: list[str], measure: list[str],
                   ignore: tuple[str, ...] = ("lm_head",), method: str = "rtn",
                   hessian_samples: torch.Tensor | None = None, gptq: Any = None) -> tuple[Analysis, bool]:
    """`analyze`, reusing a previous result for the same model, samples, formats and method
    (FRUGAL_CACHE/analysis)."""
    import dataclasses
    import hashlib
    import json

    from frugal.load.model import cache_dir

    from frugal.load.experts import expert_groups

    key = [ANALYSIS_VERSION, source_identity(source), candidates, measure, list(ignore)]
    if expert_groups(model):  # MoE experts analysed one by one (dense models keep their keys)
        key.append("experts")
    hessian_aware = methods.get(method, "analyze: method").needs_hessian
    if hessian_aware:  # round-to-nearest keys stay as they were, so earlier caches remain valid
        key += [method, dataclasses.asdict(gptq) if gptq is not None else None]
    h = hashlib.sha256(json.dumps(key).encode())
    h.update(samples.numpy().tobytes())
    if hessian_aware and hessian_samples is not None:
        h.update(hessian_samples.numpy().tobytes())
    path = cache_dir() / "analysis" / f"{h.hexdigest()[:24]}.json"
    if path.is_file():
        log.info("reusing the analysis cached in %s", path)
        return Analysis.from_dict(json.loads(path.read_text())), True
    a = analyze(model, samples, candidates, measure, ignore, method=method, hessian_samples=hessian_samples,
                gptq=gptq)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(a.to_dict()))
    tmp.replace(path)
    return a, False
