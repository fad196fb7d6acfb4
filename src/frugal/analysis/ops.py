"""Per-operator floating-point error: which operations inside a decoder block amplify rounding error.

For every (operator class C, float format F) the float model runs on the calibration tokens with the
output of every operation of class C, in every block, rounded to F, and is compared with the exact
(float32) run:

  * KL       mean over positions of KL(p_exact || p_rounded) of the next-token distributions;
  * top-1    fraction of positions whose most likely next token is unchanged;
  * final    ||h_rounded - h|| / ||h|| of the final hidden state (the input of the output head), per
             position, RMS over positions;
  * local    ||round_F(y) - y|| / ||y|| of the rounded op outputs y themselves, per row of the last dim
             (a token's hidden vector, a query's scores), RMS over every row of every rounded op;
  * amplification = final / local: above 1 the error the class injects grows on its way to the head.

Classes (CLASSES): q/k/v/o projections (`attn_linear`), Q.K^T (`scores`, before scaling, mask and
soft-capping), the attention probabilities (`softmax`), P.V (`attn_output`), the MLP projections
(`mlp_linear`), act(gate) and act(gate) * up (`mlp_act`), norm outputs incl. per-head q/k norms
(`norm`), and the adds of a sublayer output to the residual stream (`residual`).

No graph tracing: forward pre/post hooks on every module of every block keep a stack of the modules
executing; module-level classes (linear, norm, activation) are rounded in the post hooks, and a
`TorchFunctionMode` rounds function-level ones (matmul, softmax, mul, add) by the innermost module:
a matmul executed by an attention module is `scores` before its softmax and `attn_output` after it; a
mul executed by an MLP module is `mlp_act`; an add of two hidden-size tensors executed by the block
itself is `residual`. Attention runs eagerly during the analysis so that scores and softmax are torch
ops (the model's implementation is restored afterwards).

Rounding (round_to_format): fp16/bf16 are casts (round to nearest even; fp16 overflow gives inf);
the scaled formats of frugal.quant.floats are applied to the rows of the last dim, i.e. FP8 has one
float32 scale amax/fmax per row (per token for hidden states, per query for scores and
probabilities: dynamic per-token scaling), MX/NV formats scale blocks of 32/16 along the last dim
(zero-padded to a whole block). Operations outside the blocks (embedding, final norm, head) stay exact.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from frugal.errors import FrugalError
from frugal.families import FAMILIES
from frugal.evaluation.divergence import kl_sum, kl_top1

log = logging.getLogger(__name__)
OP_SENSITIVITY_VERSION = 1
CLASSES = ("attn_linear", "scores", "softmax", "attn_output", "mlp_linear", "mlp_act", "norm", "residual")
FORMAT_ALIASES = {"float16": "fp16", "bfloat16": "bf16"}
DEFAULT_FORMATS = ("bfloat16", "float16", "fp8_e4m3", "fp8_e5m2")
# Module roles that type names do not reveal, per config.model_type: role -> attribute names in a block,
# read from each family's record (FamilyRecord.roles in frugal.families).
# Elsewhere: type name with "Attention" -> attention, "MLP"/"FeedForward" -> mlp, "Norm" -> norm; a
# Linear under attention/mlp -> attn_linear/mlp_linear; an activation module under mlp -> mlp_act.
FAMILY_ROLES: dict[str, dict[str, tuple[str, ...]]] = {mt: dict(r.roles) for mt, r in FAMILIES.items() if r.roles}
ACTIVATION_MODULES = ("transformers.activations", "torch.nn.modules.activation")
MODULE_CLASSES = ("attn_linear", "mlp_linear", "mlp_act", "norm")  # rounded in post hooks

_T = torch.Tensor
MATMUL = {torch.matmul, _T.matmul, _T.__matmul__, torch.bmm, _T.bmm}
SOFTMAX = {F.softmax, torch.softmax, _T.softmax}
MUL = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__, _T.__imul__, _T.mul_}
ADD = {torch.add, _T.add, _T.__add__, _T.__radd__, _T.__iadd__, _T.add_}
INPLACE = {_T.__imul__, _T.mul_, _T.__iadd__, _T.add_}  # rounded result written back into the operand


# ---------------------------------------------------------------------------------------------
# Maths


def canonical_format(fmt: str) -> str:
    """`float16`/`bfloat16` -> fp16/bf16; float32 (exact) and frugal.quant.floats names pass through."""
    from frugal.quant.floats import FLOAT_FORMATS

    name = FORMAT_ALIASES.get(fmt, fmt)
    if name != "float32" and name not in FLOAT_FORMATS:
        raise FrugalError(f"--ops format {fmt!r}: use float32, float16, bfloat16 or one of {', '.join(FLOAT_FORMATS)}")
    return name


def round_to_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x rounded to a float format, same shape and dtype (fmt canonical, see canonical_format).

    fp16/bf16: cast and back (frugal.quant.floats does the same); scaled formats: the rows of the
    last dim as the (out, in) rows of frugal.quant.floats.fake_quantize, zero-padded to whole blocks.
    """
    if fmt == "float32":
        return x
    if fmt in ("fp16", "bf16"):
        return x.to(torch.float16 if fmt == "fp16" else torch.bfloat16).to(x.dtype)
    from frugal.quant.floats import fake_quantize, get_format

    block = get_format(fmt).block_size or 1
    rows = x.reshape(-1, x.shape[-1]).float()  # (rows, last)
    pad = -rows.shape[1] % block
    if pad:
        rows = F.pad(rows, (0, pad))  # zeros change no block's amax
    q = fake_quantize(rows, fmt)[:, : x.shape[-1]]
    return q.reshape(x.shape).to(x.dtype)


def row_rel_error(r: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    """(sum over rows of ||r_i - y_i||^2 / ||y_i||^2, rows counted, overflows) along the last dim.

    Rows are tokens (hidden states) or queries (scores, probabilities), so one token's massive
    activation weighs like any other token. Rows with ||y_i|| = 0 or a non-finite r_i are left out;
    an overflow is a finite element of y whose rounding is not (fp16 beyond 65504).
    """
    r2, y2 = r.reshape(-1, r.shape[-1]), y.reshape(-1, y.shape[-1])  # (rows, n)
    num = (r2 - y2).square().sum(-1, dtype=torch.float64)  # (rows,)
    den = y2.square().sum(-1, dtype=torch.float64)
    ok = torch.isfinite(num) & torch.isfinite(den) & (den > 0)
    overflows = int((torch.isfinite(y2) & ~torch.isfinite(r2)).sum())
    return float((num[ok] / den[ok]).sum()), int(ok.sum()), overflows


# ---------------------------------------------------------------------------------------------
# Glue: module roles, hooks and the function mode


def module_roles(block: nn.Module, model_type: str) -> dict[str, str | None]:
    """Role of every module of a block by its name inside the block ("" is the block itself):
    a context (block, attention, mlp), a rounded class (MODULE_CLASSES) or None."""
    table = FAMILY_ROLES.get(model_type, {})
    roles: dict[str, str | None] = {}
    context: dict[str, str | None] = {}
    for name, m in block.named_modules():
        parent = context.get(name.rpartition(".")[0]) if name else None
        leaf, tname = name.rpartition(".")[2], type(m).__name__
        override = next((r for r, leaves in table.items() if leaf in leaves), None)
        if not name:
            role = "block"
        elif override:
            role = override
        elif "Attention" in tname:
            role = "attention"
        elif "MLP" in tname or "FeedForward" in tname:
            role = "mlp"
        elif "Norm" in tname:
            role = "norm"
        elif isinstance(m, nn.Linear):
            role = {"attention": "attn_linear", "mlp": "mlp_linear"}.get(parent)
        elif parent == "mlp" and type(m).__module__ in ACTIVATION_MODULES:
            role = "mlp_act"
        else:
            role = None
        roles[name] = role
        context[name] = role if role in ("attention", "mlp") else parent
    return roles


class OpRounding(TorchFunctionMode):
    """Context manager: while active, the outputs of the `selected` classes (in block `block`, or in
    every block when None) are rounded to `fmt`; every classified op is counted per block.

    Entering forces eager attention and installs the hooks; leaving restores the attention
    implementation and removes every hook. `selected`, `fmt` and `block` may change between forwards.
    """

    def __init__(self, model: nn.Module, selected=(), fmt: str = "float32", block: int | None = None):
        super().__init__()
        from frugal.load.blocks import find_blocks

        self.model, self.selected, self.fmt, self.block = model, set(selected), canonical_format(fmt), block
        _, self.blocks = find_blocks(model)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.hidden = cfg.hidden_size
        self.roles = [module_roles(b, getattr(cfg, "model_type", "")) for b in self.blocks]
        self.stack: list[tuple[str | None, int, dict]] = []  # (role, block index, per-call state)
        self.busy = False
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        """Zero the counts and error sums (and the module stack)."""
        self.stack.clear()
        self.counts = [dict.fromkeys(CLASSES, 0) for _ in self.blocks]  # counts[b][class]
        self.rel_sq, self.rows = 0.0, 0  # sum of squared per-row relative errors, rows
        self.overflows = 0

    def __enter__(self):
        self._attn = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            for b, block in enumerate(self.blocks):
                for name, m in block.named_modules():
                    self._handles.append(m.register_forward_pre_hook(self._push(self.roles[b][name], b)))
                    self._handles.append(m.register_forward_hook(self._pop))
        except BaseException:
            self._restore()
            raise
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore()

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.set_attn_implementation(self._attn)

    def _push(self, role: str | None, b: int):
        def hook(_mod, _args):
            if role == "block":
                self.stack.clear()  # a block is outermost: drop frames an interrupted forward left
            self.stack.append((role, b, {}))
        return hook

    def _pop(self, _mod, _args, out):
        role, b, _ = self.stack.pop()
        if role in MODULE_CLASSES and isinstance(out, torch.Tensor):
            return self._apply(role, b, out)
        return None

    def _apply(self, cls: str, b: int, out: torch.Tensor) -> torch.Tensor:
        """Count one op of class `cls` in block b; round its output if selected."""
        self.counts[b][cls] += 1
        if cls not in self.selected or (self.block is not None and b != self.block) or self.fmt == "float32":
            return out
        self.busy = True
        try:
            r = round_to_format(out, self.fmt)
            e, n, o = row_rel_error(r, out)
        finally:
            self.busy = False
        self.rel_sq, self.rows, self.overflows = self.rel_sq + e, self.rows + n, self.overflows + o
        return r

    def classify(self, func, args, out) -> str | None:
        """Function-level class of an op executed by the innermost module on the stack."""
        role, _, state = self.stack[-1]
        if role == "attention" and func in SOFTMAX:
            state["softmax"] = True
            return "softmax"
        if role == "attention" and func in MATMUL:
            return "attn_output" if state.get("softmax") else "scores"
        if role == "mlp" and func in MUL:
            return "mlp_act"
        if role == "block" and func in ADD and len(args) >= 2:
            a, b = args[0], args[1]
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
                    and out.shape[-1] == self.hidden and out.is_floating_point():
                return "residual"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.busy or not self.stack or not isinstance(out, torch.Tensor):
            return out
        cls = self.classify(func, args, out)
        if cls is None:
            return out
        r = self._apply(cls, self.stack[-1][1], out)
        if func in INPLACE and r is not out:
            out.copy_(r)  # the mode is off inside __torch_function__: not intercepted
            return out
        return r


# ---------------------------------------------------------------------------------------------
# Analysis


@dataclass
class OpRow:
    """One (operator class, format) measurement."""

    cls: str
    fmt: str
    ops_per_block: float  # classified ops per block per forward (mean over blocks)
    local_rel_error: float  # RMS over rows of ||round(y_i) - y_i|| / ||y_i||, over the rounded op outputs
    final_rel_error: float  # RMS over positions of ||dh_i|| / ||h_i|| of the head's input
    amplification: float | None  # final / local (None when local is 0)
    kl: float  # nats per position
    top1: float  # agreement of the argmax with the exact run
    overflows: int  # finite outputs that became inf when rounded (fp16)


@dataclass
class OpSensitivity:
    version: int
    formats: list[str]
    classes: list[str]
    rows: list[OpRow]
    counts: dict[str, list[int]]  # class -> ops per block in one forward of one sample
    per_block: dict[str, list[float]] = field(default_factory=dict)  # class -> KL with only block b rounded
    per_block_format: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self, cls: str, fmt: str) -> OpRow:
        return next(r for r in self.rows if r.cls == cls and r.fmt == fmt)

    def table(self) -> str:
        """Markdown: one line per (class, format), classes in CLASSES order."""
        lines = ["| class | format | ops/block | local rel. err | final rel. err | amplification | KL | top-1 |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            amp = f"{r.amplification:.3g}" if r.amplification is not None else "-"
            over = f" ({r.overflows} inf)" if r.overflows else ""
            lines.append(f"| {r.cls} | {r.fmt} | {r.ops_per_block:g} | {r.local_rel_error:.3g} | "
                         f"{r.final_rel_error:.3g}{over} | {amp} | {r.kl:.3g} | {r.top1:.4f} |")
        return "\n".join(lines)

    def per_block_table(self) -> str:
        """Markdown: KL with one class rounded in one block only (rows: blocks)."""
        if not self.per_block:
            return ""
        cls = list(self.per_block)
        lines = [f"| block | {' | '.join(cls)} |", "|---:|" + "---:|" * len(cls)]
        for b in range(len(next(iter(self.per_block.values())))):
            lines.append(f"| {b} | " + " | ".join(f"{self.per_block[c][b]:.3g}" for c in cls) + " |")
        return "\n".join(lines)


@dataclass
class _Run:
    """Accumulated comparison of one rounded run against the exact one."""

    kl: float = 0.0
    agree: int = 0
    positions: int = 0
    rel_sq: float = 0.0  # sum over positions of ||dh||^2 / ||h||^2
    rows: int = 0


class _HeadInput:
    """Records the input of the output head (the final hidden state) of each forward."""

    def __init__(self, model: nn.Module):
        self.h: torch.Tensor | None = None
        self.handle = model.get_output_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, _mod, args):
        self.h = args[0][0].detach().float()  # (L, hidden)


@torch.no_grad()
def _run(model, samples, rounding: OpRounding, head: _HeadInput, ref=None) -> tuple[list, list, _Run]:
    """Every sample through the model under `rounding` (counts and sums reset first); returns the
    (L, V) float64 log-probs and (L, hidden) head inputs, or only the comparison with `ref` when given.
    float64 log-probs keep the KL of tiny logit changes (fp16) above the float32 round-off floor."""
    rounding.reset()
    lps, hs, acc = [], [], _Run()
    for s in range(samples.shape[0]):
        lp = F.log_softmax(model(samples[s : s + 1], use_cache=False).logits[0].double(), dim=-1)  # (L, V)
        if ref is None:
            lps.append(lp)
            hs.append(head.h)
            continue
        kl, agree = kl_top1(ref[0][s], lp, torch.float64)
        acc.kl, acc.agree, acc.positions = acc.kl + kl, acc.agree + agree, acc.positions + lp.shape[0]
        e, n, _ = row_rel_error(head.h, ref[1][s])
        acc.rel_sq, acc.rows = acc.rel_sq + e, acc.rows + n
    return lps, hs, acc


def _row(cls: str, fmt: str, rounding: OpRounding, acc: _Run, n_samples: int) -> OpRow:
    ops = sum(c[cls] for c in rounding.counts) / (len(rounding.counts) * n_samples)
    local = math.sqrt(rounding.rel_sq / rounding.rows) if rounding.rows else 0.0
    final = math.sqrt(acc.rel_sq / acc.rows) if acc.rows else 0.0
    return OpRow(cls, fmt, ops, local, final, final / local if local > 0 else None,
                 max(acc.kl / acc.positions, 0.0), acc.agree / acc.positions, rounding.overflows)


def _counts(rounding: OpRounding, n_samples: int) -> dict[str, list[int]]:
    """class -> ops per block in one forward of one sample (from the reference run)."""
    return {c: [rounding.counts[b][c] // n_samples for b in range(len(rounding.counts))] for c in CLASSES}


@torch.no_grad()
def op_sensitivity(model: nn.Module, samples: torch.Tensor, formats=DEFAULT_FORMATS, classes=None,
                   per_block: bool = False, per_block_samples: int = 1) -> OpSensitivity:
    """Round each class's op outputs to each format in every block; compare with the exact run.

    per_block: also the KL with one class rounded in one block at a time, for the worst format (the
    largest mean KL over classes), on the first `per_block_samples` samples.
    """
    classes = list(classes or CLASSES)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise FrugalError(f"--ops class {unknown[0]!r}: classes are {', '.join(CLASSES)}")
    fmts = {f: canonical_format(f) for f in formats}
    n = samples.shape[0]
    t0 = time.perf_counter()
    rows: list[OpRow] = []
    head = _HeadInput(model)
    try:
        with OpRounding(model) as rounding:
            ref = _run(model, samples, rounding, head)[:2]
            counts = _counts(rounding, n)
            bar = tqdm(total=len(classes) * len(fmts), desc="op sensitivity", unit="run")
            for cls in classes:
                for name, fmt in fmts.items():
                    rounding.selected, rounding.fmt = {cls}, fmt
                    rows.append(_row(cls, name, rounding, _run(model, samples, rounding, head, ref)[2], n))
                    bar.update()
            bar.close()
            rounding.selected = set()
            t1 = time.perf_counter()
            worst, blocks = _per_block(model, samples[:per_block_samples], rounding, rows, classes, fmts) \
                if per_block else (None, {})
    finally:
        head.handle.remove()
    seconds = {"classes": t1 - t0, "per_block": time.perf_counter() - t1}
    calib = {"num_samples": n, "seq_len": samples.shape[1], "per_block_samples": per_block_samples if per_block else 0}
    return OpSensitivity(OP_SENSITIVITY_VERSION, list(fmts), classes, rows, counts, blocks, worst, seconds, calib)


def _per_block(model, samples, rounding: OpRounding, rows, classes, fmts) -> tuple[str, dict[str, list[float]]]:
    """KL with class c rounded in block b only, for the format of the largest mean KL; blocks b.. are
    re-run from the exact inputs of block b (cached by frugal.analysis.analyze.TailRunner)."""
    from frugal.analysis.analyze import TailRunner

    worst = max(fmts, key=lambda f: sum(r.kl for r in rows if r.fmt == f))
    log.info("per block: one class in one block at a time, rounded to %s (largest mean KL)", worst)
    runner = TailRunner(model, samples, {})  # under eager attention, nothing selected
    ref = [F.log_softmax(runner.head(x)[0].double(), dim=-1) for x in runner.inputs[-1]]  # (L, V) each
    rounding.fmt = fmts[worst]
    out: dict[str, list[float]] = {c: [] for c in classes}
    bar = tqdm(total=len(classes) * len(runner.blocks), desc=f"op sensitivity per block ({worst})", unit="run")
    for b in range(len(runner.blocks)):
        for cls in classes:
            rounding.reset()
            rounding.selected, rounding.block = {cls}, b
            out[cls].append(_tail_kl(runner, b, ref))
            bar.update()
    bar.close()
    rounding.selected, rounding.block = set(), None
    return worst, out


def _tail_kl(runner, b: int, ref: list[torch.Tensor]) -> float:
    """Mean KL(ref || model) per position, re-running blocks b.. on the cached inputs (float64 log-probs)."""
    kl, positions = 0.0, 0
    for s, x in enumerate(runner.inputs[b]):
        for i in range(b, len(runner.blocks)):
            x = runner.run_block(runner.blocks[i], x, runner.args, runner.kwargs[i])
        lp = F.log_softmax(runner.head(x)[0].double(), dim=-1)
        kl, positions = kl + kl_sum(ref[s], lp, torch.float64), positions + lp.shape[0]
    return max(kl / positions, 0.0)
