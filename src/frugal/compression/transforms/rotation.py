"""Offline rotations fused into the weights (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

An orthogonal R leaves RMSNorm unchanged on a rotated input (rms(x R) = rms(x)) once the norm's own
weight is folded into the linears that read its output. So, with row vectors x (.., hidden):

    R1 (hidden x hidden), the residual stream:   E <- E R1                      embedding rows
                                                 W <- diag-fused W, then W R1   every reader (q/k/v, gate/up, head)
                                                 W <- R1^T W,  b <- R1^T b      every writer (o_proj, down_proj)
    R2 (head_dim x head_dim), per head:          W_v[h] <- R2^T W_v[h]          value rows of each KV head
                                                 W_o[:, h] <- W_o[:, h] R2      o_proj input columns of each head

The rotated model computes the same function with no extra runtime operation, and its weights are
more incoherent (no outlier columns), which helps rounding. One R2 serves every head, so GQA (query
heads sharing a KV head) stays consistent. Rotations are built and applied in float64 and each weight
is rounded once to the model dtype.

Hadamard rotations: R = D H / sqrt(n) with D a seeded random sign diagonal and H a Hadamard matrix
built from Sylvester doubling, Paley I (q prime, q = 3 mod 4, order q + 1), Paley II (q prime,
q = 1 mod 4, order 2(q + 1)) and Kronecker products of those. That covers 576 = 2·2·2·72 (72 = 71 + 1),
so SmolLM2's hidden size gets a true Hadamard matrix (every entry ±1/24). For a size with no such
construction the rotation is kron(H_a / sqrt(a), Haar-random orthogonal (n / a)) with a the largest
constructible divisor of n (logged): still orthogonal, incoherent across the Hadamard factor only.

Model differences are data: each family's record in frugal.families says where the norms, readers and
writers are (`FamilyRecord.rotation`) or why the family cannot be rotated exactly (`rotation_refused`).
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from frugal.quant.options import ROTATIONS, RotationOptions
from frugal.compression.transforms.base import Place, Transform
from frugal.errors import FrugalError
from frugal.families import FamilyRecord, RotationLayout, family, supporting

log = logging.getLogger(__name__)

# -- Hadamard matrices (entries ±1, H H^T = n I) ---------------------------------------------------

def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) Q[i, j] = Legendre symbol of (j - i) mod q, for a prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, Q]] skew-symmetric."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q = 1 mod 4, from the symmetric conference matrix C."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@lru_cache(maxsize=None)
def _hadamard_cached(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4:
        return None  # no Hadamard matrix of order > 2 that is not a multiple of 4
    if n & (n - 1) == 0:  # Sylvester
        h = _hadamard_cached(n // 2)
        return torch.kron(_hadamard_cached(2), h)
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley1(n - 1)
    if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley2(n // 2 - 1)
    for a in range(2, math.isqrt(n) + 1):
        if n % a == 0:
            ha, hb = _hadamard_cached(a), _hadamard_cached(n // a)
            if ha is not None and hb is not None:
                return torch.kron(ha, hb)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """(n, n) float64 Hadamard matrix (entries ±1, H H^T = n I), or None when none is constructed."""
    h = _hadamard_cached(n)
    return None if h is None else h.clone()


# -- Orthogonal rotations -----------------------------------------------------------------------

def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, n) Haar-random orthogonal matrix: QR of a Gaussian, columns signed by diag(R)."""
    g = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


def random_hadamard(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, n) D H / sqrt(n), D a random sign diagonal; sizes without a Hadamard matrix get
    kron(H_a / sqrt(a), random orthogonal (n / a)) with a the largest constructible divisor."""
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    h = hadamard(n)
    if h is not None:
        return signs[:, None] * h / math.sqrt(n)
    a = max(d for d in range(1, n + 1) if n % d == 0 and _hadamard_cached(d) is not None)
    log.warning("no Hadamard matrix of order %d constructed; using kron(H_%d, random orthogonal %d)", n, a, n // a)
    r = torch.kron(hadamard(a) / math.sqrt(a), random_orthogonal(n // a, gen))
    return signs[:, None] * r


def rotation(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, n) float64 orthogonal matrix of the given kind ("hadamard" or "random")."""
    if kind == "hadamard":
        return random_hadamard(n, gen)
    if kind == "random":
        return random_orthogonal(n, gen)
    raise FrugalError(f"rotation.kind={kind!r}: choose one of {', '.join(ROTATIONS[1:])}")


# -- Pure weight transforms (float64 in, float64 out) -----------------------------------------------

def fuse_norm(w: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """W diag(gamma): a linear reading a norm's output absorbs the norm's weight. w: (out, in)."""
    return w * gamma[None, :]


def rotate_reader(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W R for a linear whose input is rotated by R. w: (out, in), r: (in, in)."""
    return w @ r


def rotate_writer(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """R^T W (also for a bias (out,)) for a linear whose output must come out rotated by R."""
    return r.T @ w


def rotate_head_rows(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """R2^T W_h for each head's block of rows (values); w: (heads * head_dim, in) or a bias."""
    d = r.shape[0]
    wh = w.reshape(-1, d, *w.shape[1:])  # (heads, head_dim, in) or (heads, head_dim)
    return torch.einsum("ji,hj...->hi...", r, wh).reshape(w.shape)


def rotate_head_cols(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W[:, h] R2 for each head's block of input columns (o_proj); w: (out, heads * head_dim)."""
    d = r.shape[0]
    return (w.reshape(w.shape[0], -1, d) @ r).reshape(w.shape)


def incoherence(w: torch.Tensor) -> torch.Tensor:
    """max|w| / rms(w) per row: sqrt(in) for a single spike, ~3-4 for a Gaussian row. w: (out, in)."""
    w = w.detach().double()
    return w.abs().amax(1) / w.pow(2).mean(1).sqrt().clamp_min(1e-300)


# -- Families -----------------------------------------------------------------------------------

def _family(model: nn.Module) -> FamilyRecord:
    """The model's family record, which has a rotation layout (frugal.families), or a FrugalError."""
    mt = getattr(model.config, "model_type", None)
    record = family(mt)
    if record is not None and record.rotation_refused:
        raise FrugalError(f"rotation: model_type {mt!r} cannot be rotated exactly: {record.rotation_refused}")
    if record is None or record.rotation is None:
        raise FrugalError(f"rotation: model_type {mt!r} has no rotation table "
                          f"(supported: {', '.join(supporting('rotation'))})")
    return record


def _heads(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _module(root: nn.Module, path: str, kind: type | None, where: str) -> nn.Module:
    try:
        m = root.get_submodule(path)
    except AttributeError:
        raise FrugalError(f"rotation: {where}{path} not found") from None
    if kind is not None and not isinstance(m, kind):
        raise FrugalError(f"rotation: {where}{path} is a {type(m).__name__}, expected {kind.__name__}")
    return m


def _check_norm(norm: nn.Module, where: str) -> None:
    if "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
        raise FrugalError(f"rotation: {where} is a {type(norm).__name__}; only RMSNorm without bias can be fused")


def _value_rows(fam: RotationLayout, config) -> slice:
    heads, kv, d = _heads(config)
    start = heads * d + kv * d if fam.v_after_qk else 0
    return slice(start, start + kv * d)


def check(model: nn.Module) -> FamilyRecord:
    """Refuse, before any work, a model whose architecture cannot be rotated exactly; its family record."""
    from frugal.load.blocks import find_blocks

    record = _family(model)
    fam = record.rotation
    _, _, d = _heads(model.config)
    _module(model, fam.embedding, nn.Embedding, "")
    _module(model, fam.head, nn.Linear, "")
    _check_norm(_module(model, fam.final_norm, None, ""), fam.final_norm)
    blocks_name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        where = f"{blocks_name}.{i}."
        for norm, readers in fam.norms_to_readers():
            _check_norm(_module(block, norm, None, where), where + norm)
            for r in readers:
                _module(block, r, nn.Linear, where)
        _module(block, fam.mlp_out, nn.Linear, where)
        o = _module(block, fam.attn_out, nn.Linear, where)
        v = _module(block, fam.v_proj, nn.Linear, where)
        rows = _value_rows(fam, model.config)
        if v.out_features < rows.stop or o.in_features % d:
            raise FrugalError(f"rotation: {where}{fam.v_proj}/{fam.attn_out} do not match head_dim {d}")
    return record


# -- Model walking (glue) -----------------------------------------------------------------------

def untie_head(model: nn.Module, embedding: nn.Embedding, head: nn.Linear) -> bool:
    """Give an output head tied to the embedding its own weight (the two are rotated differently)."""
    if head.weight.untyped_storage().data_ptr() != embedding.weight.untyped_storage().data_ptr():
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    log.info("rotation: output head untied from the input embedding")
    return True


class _Float64Weights:
    """Float64 copies of linear weights (and biases), transformed in place and stored once."""

    def __init__(self, root: nn.Module):
        self.root, self.w, self.b = root, {}, {}

    def get(self, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if path not in self.w:
            lin = self.root.get_submodule(path)
            self.w[path] = lin.weight.detach().double()  # (out, in)
            self.b[path] = None if lin.bias is None else lin.bias.detach().double()
        return self.w[path], self.b[path]

    def store(self) -> None:
        for path, w in self.w.items():
            lin = self.root.get_submodule(path)
            lin.weight.data.copy_(w.to(lin.weight.dtype))
            if self.b[path] is not None:
                lin.bias.data.copy_(self.b[path].to(lin.bias.dtype))


def _fuse_and_rotate_readers(ws: _Float64Weights, norm: nn.Module, readers: tuple[str, ...], r1: torch.Tensor,
                             offset: float) -> None:
    """Fold the norm's weight into its readers, rotate their inputs by R1, and reset the norm."""
    gamma = norm.weight.detach().double() + offset  # (hidden,)
    for path in readers:
        ws.w[path] = rotate_reader(fuse_norm(ws.get(path)[0], gamma), r1)
    norm.weight.data.fill_(1.0 - offset)


def _rotate_block(block: nn.Module, record: FamilyRecord, r1: torch.Tensor, r2: torch.Tensor | None,
                  rows: slice) -> None:
    fam, ws = record.rotation, _Float64Weights(block)
    for norm, readers in fam.norms_to_readers():
        _fuse_and_rotate_readers(ws, block.get_submodule(norm), readers, r1, record.norm.offset)
    for path in (fam.attn_out, fam.mlp_out):
        w, b = ws.get(path)
        ws.w[path] = rotate_writer(w, r1)
        if b is not None:
            ws.b[path] = rotate_writer(b, r1)
    if r2 is not None:
        w, b = ws.get(fam.v_proj)
        w[rows] = rotate_head_rows(w[rows], r2)
        if b is not None:
            b[rows] = rotate_head_rows(b[rows], r2)
        ws.w[fam.attn_out] = rotate_head_cols(ws.get(fam.attn_out)[0], r2)
    ws.store()


@torch.no_grad()
def rotate_model(model: nn.Module, options: RotationOptions) -> dict[str, object]:
    """Fuse the rotation `options` asks for into `model` in place; returns what was done (for a report)."""
    from frugal.load.blocks import find_blocks

    options.validate()
    if options.kind == "none":
        return {"kind": "none"}
    record = check(model)
    fam = record.rotation
    _, _, head_dim = _heads(model.config)
    gen = torch.Generator().manual_seed(options.seed)
    r1 = rotation(options.kind, model.config.hidden_size, gen)  # (hidden, hidden)
    r2 = rotation(options.kind, head_dim, gen) if options.per_head else None  # (head_dim, head_dim)
    emb, head = model.get_submodule(fam.embedding), model.get_submodule(fam.head)
    untied = untie_head(model, emb, head)
    emb.weight.data.copy_((emb.weight.detach().double() @ r1).to(emb.weight.dtype))  # (vocab, hidden)
    rows = _value_rows(fam, model.config)
    blocks_name, blocks = find_blocks(model)
    for block in tqdm(blocks, desc=f"rotate ({options.kind})", unit="block"):
        _rotate_block(block, record, r1, r2, rows)
    ws = _Float64Weights(model)
    _fuse_and_rotate_readers(ws, model.get_submodule(fam.final_norm), (fam.head,), r1, record.norm.offset)
    ws.store()
    log.info("rotation: %s R1 (%d) %s fused into %d blocks of %s", options.kind, r1.shape[0],
             f"and R2 ({head_dim})" if r2 is not None else "without R2", len(blocks), blocks_name)
    return {"kind": options.kind, "seed": options.seed, "per_head": options.per_head, "untied_head": untied}


def _check(model: nn.Module, recipe) -> None:
    """Refuse a family that cannot be rotated exactly; warn where rotation is known to hurt."""
    from frugal.compression import methods

    check(model)
    if not methods.get(recipe.method).needs_hessian:
        log.warning("rotation with %s: on the default model rotation helps GPTQ (W4 g64 ppl 48.3 -> 41.7) but "
                    "hurts round-to-nearest (52.0 -> 82.0); see docs/design.md", recipe.method)


TRANSFORM = Transform(name="rotation", summary="orthogonal rotations fused into the weights (QuaRot/SpinQuant)",
                      enabled=lambda recipe: recipe.rotation.kind != "none", needs_calibration=False,
                      steps={Place.MODEL: lambda model, recipe: rotate_model(model, recipe.rotation)}, check=_check,
                      streaming="rotations transform the whole model at once; use the in-memory path")
