"""MoE experts as one `nn.Linear` per expert and projection, and back to the checkpoint's layout.

transformers 5 keeps a MoE layer's experts as fused 3-D parameters (`experts.gate_up_proj` (E, 2I, H),
`experts.down_proj` (E, H, I); `is_transposed` layouts (E, in, out)) behind its experts interface
(`has_gate`, `has_bias`, `is_transposed`, `num_experts`, `_apply_gate`). `unfuse_experts` replaces each
such module by an `ExpertLinears` whose expert e holds `gate_up_proj` (or `up_proj`) and `down_proj` as
`nn.Linear` views of the fused tensors and whose forward is the eager per-expert loop: every method then
quantizes each expert as its own matrix, and the statistics hooks on an expert's layers see exactly the
tokens routed to it.

Checkpoints store experts in their own layout (per expert `experts.3.gate_proj.weight`, or fused under
another name). `Layout` finds it with transformers' own reverse conversion (`revert_weight_conversion`)
applied to an index tensor (each weight row's position), so every family's mapping comes from the
library that loads it: rows are gathered to write and scattered to read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from frugal.load.modules import replace_modules

log = logging.getLogger(__name__)

_INTERFACE = ("has_gate", "is_transposed", "num_experts")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with 3-D weights (the experts interface)."""
    down = getattr(module, "down_proj", None)
    return (not isinstance(module, ExpertLinears) and all(hasattr(module, a) for a in _INTERFACE)
            and isinstance(down, torch.Tensor) and down.dim() == 3)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear over an existing (out, in) weight (a view: no copy, no random init)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class ExpertLinears(nn.Module):
    """The experts of one MoE layer, expert e as child `e` with `<in_proj>` and `down_proj` linears."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.in_proj = "gate_up_proj" if fused.has_gate else "up_proj"
        self.num_experts, self.has_gate = int(fused.num_experts), bool(fused.has_gate)
        self.is_transposed, self.has_bias = bool(fused.is_transposed), bool(getattr(fused, "has_bias", False))
        for e in range(self.num_experts):
            expert = nn.Module()
            for proj in (self.in_proj, "down_proj"):
                w = getattr(fused, proj)[e]  # (out, in), or (in, out) transposed
                b = getattr(fused, f"{proj}_bias")[e] if self.has_bias else None
                setattr(expert, proj, _linear(w.t().contiguous() if self.is_transposed else w, b))
            self.add_module(str(e), expert)
        if getattr(fused, "has_post_expert_norm", False):
            self.post_expert_norm = fused.post_expert_norm
        for name in list(fused._parameters):
            fused._parameters[name] = None  # the linears hold the weights now
        object.__setattr__(self, "_fused", fused)  # its `_apply_gate`, `act_fn` and constants; not a child

    def expert(self, e: int) -> nn.Module:
        return self._modules[str(e)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden) -> (tokens, hidden): each expert on the tokens routed to it, weighted and summed."""
        out = torch.zeros_like(hidden_states)
        fused = self._fused
        for e in range(self.num_experts):
            pos, tok = torch.where(top_k_index.T == e)  # (k, tokens) order, as transformers' eager loop
            if tok.numel() == 0:
                continue
            expert = self.expert(e)
            h = getattr(expert, self.in_proj)(hidden_states[tok])
            h = type(fused)._apply_gate(fused, h) if self.has_gate else fused.act_fn(h)
            h = expert.down_proj(h)
            if hasattr(self, "post_expert_norm"):
                h = self.post_expert_norm(h)
            out.index_add_(0, tok, (h * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by an ExpertLinears (in place); how many."""
    return replace_modules(model, is_fused_experts, ExpertLinears)


def moe_layers(model: nn.Module) -> list[str]:
    """Names of the model's MoE experts modules, fused (transformers') or unfused (ExpertLinears)."""
    return [n for n, m in model.named_modules() if isinstance(m, ExpertLinears) or is_fused_experts(m)]


def expert_groups(model: nn.Module) -> dict[str, ExpertLinears]:
    """Every ExpertLinears by its module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLinears)}


def routers(module: nn.Module) -> set[int]:
    """ids of the linear layers that route tokens in `module`'s MoE layers (kept float by default): linears
    under an experts module's parent, outside the experts, with one output per expert or a single one
    (a shared expert's gate)."""
    found: set[int] = set()
    for name, mod in module.named_modules():
        if not (isinstance(mod, ExpertLinears) or is_fused_experts(mod)):
            continue
        parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        inside = {id(m) for m in mod.modules()}
        found |= {id(m) for m in parent.modules() if isinstance(m, nn.Linear) and id(m) not in inside
                  and m.out_features in (int(mod.num_experts), 1)}
    return found


def is_expert_layer(name: str, groups: dict[str, ExpertLinears]) -> str | None:
    """The ExpertLinears name that owns the linear layer `name` (`<group>.<e>.<proj>`), else None."""
    group, _, rest = name.rpartition(".")
    group = group.rpartition(".")[0]
    return group if group in groups and rest in (groups[group].in_proj, "down_proj") else None


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor of an expert projection: the (expert, row) of each of its rows."""

    name: str  # checkpoint tensor name
    shape: tuple[int, ...]  # its shape, the input dimension as 1
    in_dim: int | None  # where the input dimension is (None: a bias)
    expert: torch.Tensor  # (rows,) expert of each row, in the tensor's row order
    row: torch.Tensor  # (rows,) row of that expert's (out, in) weight

    @property
    def single_expert(self) -> int | None:
        """The expert whose rows make up this tensor, when it is one expert's 2-D weight; else None."""
        e = self.expert.unique()
        return int(e[0]) if len(e) == 1 and self.in_dim == len(self.shape) - 1 == 1 else None


def layout(model: nn.Module, group: str, proj: str, bias: bool = False) -> list[Part]:
    """How the checkpoint stores projection `proj` (or its bias) of the experts `group` (revert of an index
    tensor through transformers' conversion mapping for `model`)."""
    from transformers.core_model_loading import revert_weight_conversion

    ex = model.get_submodule(group)
    out = getattr(ex.expert(0), proj).out_features
    idx = torch.arange(ex.num_experts * out, dtype=torch.float64).reshape(ex.num_experts, out)
    key = f"{group}.{proj}_bias" if bias else f"{group}.{proj}"
    if not bias:
        idx = idx.unsqueeze(1) if ex.is_transposed else idx.unsqueeze(2)  # the model's layout, in = 1
    parts = []
    for name, t in revert_weight_conversion(model, {key: idx}).items():
        in_dim = None
        if not bias:
            ones = [d for d in range(t.dim()) if t.shape[d] == 1]
            in_dim = ones[-1] if ones else None
        flat = (t if in_dim is None else t.movedim(in_dim, -1)).reshape(-1).long()
        parts.append(Part(name, tuple(t.shape), in_dim, flat // out, flat % out))
    return parts


def gather_rows(part: Part, rows_of) -> torch.Tensor:
    """The checkpoint tensor `part` from `rows_of(e)`: expert e's (out, ...) tensor."""
    first = rows_of(int(part.expert[0]))
    rows = torch.empty((len(part.row), *first.shape[1:]), dtype=first.dtype)
    for e in part.expert.unique().tolist():
        sel = part.expert == e
        rows[sel] = rows_of(e)[part.row[sel]]
    if part.in_dim is None:
        return rows.reshape(part.shape)
    moved = list(part.shape)
    moved.append(moved.pop(part.in_dim))
    return rows.reshape(*moved[:-1], rows.shape[-1]).movedim(-1, part.in_dim)


def scatter_rows(part: Part, tensor: torch.Tensor, into: dict[int, torch.Tensor]) -> None:
    """Write the checkpoint tensor `part` into each expert's (out, ...) tensor in `into`."""
    rows = tensor if part.in_dim is None else tensor.movedim(part.in_dim, -1)
    rows = rows.reshape(len(part.row), *(() if part.in_dim is None else (rows.shape[-1],)))
    for e in part.expert.unique().tolist():
        sel = part.expert == e
        into[e][part.row[sel]] = rows[sel].to(into[e].dtype)


def row_slice(qw: Any, rows: torch.Tensor) -> Any:
    """The QuantizedWeight of some output rows of `qw` (codes, scales and zero points sliced alike); a
    scheme record without codes (streaming's) as it is."""
    if not hasattr(qw, "q"):
        return qw
    zp = None if qw.zero_point is None else qw.zero_point[rows]
    return replace(qw, q=qw.q[rows], scale=qw.scale[rows], zero_point=zp)


def is_expert_tensor(key: str, groups: dict[str, ExpertLinears]) -> bool:
    """`<group>.<e>.<proj>.weight|bias`: a tensor of an expert linear (frugal's names)."""
    return is_expert_layer(key.rpartition(".")[0], groups) is not None


def to_checkpoint(model: nn.Module, sd: dict[str, torch.Tensor], quantized: dict[str, Any],
                  dtype: torch.dtype | None, dense: bool = True, groups: Any = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The state dict `sd` and quantized weights of `model` from frugal's expert names (`<group>.<e>.<proj>`)
    to the checkpoint's: (state dict, quantized weights by checkpoint layer name, the checkpoint layers that
    are one expert's 2-D weight). Where a checkpoint tensor is not one expert's rows (a fused 3-D
    checkpoint), the quantized experts are stored dequantized, with a warning; `dense` False: names only
    (no dense tensors gathered, no warning); `groups`: only those experts (a streamed block's)."""
    every = expert_groups(model)
    sd = {k: v for k, v in sd.items() if not is_expert_tensor(k, every)}
    out_q = {n: qw for n, qw in quantized.items() if is_expert_layer(n, every) is None}
    linears: list[str] = []
    for g, ex in _selected(model, groups).items():
        for proj in (ex.in_proj, "down_proj"):
            lins = [getattr(ex.expert(e), proj) for e in range(ex.num_experts)]
            names = [f"{g}.{e}.{proj}" for e in range(ex.num_experts)]
            parts = layout(model, g, proj)
            packed = all(n in quantized for n in names) and all(p.single_expert is not None for p in parts)
            if dense and any(n in quantized for n in names) and not packed:
                log.warning("%s.*.%s: the checkpoint stores these experts fused; written dequantized", g, proj)
            for part in parts:
                layer = part.name.removesuffix(".weight")
                if part.single_expert is not None:
                    linears.append(layer)
                if packed:
                    out_q[layer] = row_slice(quantized[names[part.single_expert]], part.row)
                elif dense:
                    w = gather_rows(part, lambda e: lins[e].weight.detach())
                    sd[part.name] = w if dtype is None or not w.is_floating_point() else w.to(dtype)
            if ex.has_bias and dense:
                for part in layout(model, g, proj, bias=True):
                    b = gather_rows(part, lambda e: lins[e].bias.detach())
                    sd[part.name] = b if dtype is None else b.to(dtype)
    return sd, out_q, linears


def _selected(model: nn.Module, groups: Any) -> dict[str, ExpertLinears]:
    """The model's ExpertLinears, only those named in `groups` when it is given."""
    found = expert_groups(model)
    return found if groups is None else {g: found[g] for g in groups}


def checkpoint_expert_tensors(model: nn.Module, groups: Any = None) -> list[str]:
    """The checkpoint tensor names that hold the experts `groups` (default: all) of the unfused `model`."""
    names = []
    for g, ex in _selected(model, groups).items():
        for proj in (ex.in_proj, "down_proj"):
            for bias in (False, True) if ex.has_bias else (False,):
                names += [p.name for p in layout(model, g, proj, bias=bias)]
    return names


def from_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], groups: Any = None) -> dict[str, torch.Tensor]:
    """`state` (checkpoint names, float weights) with the tensors of the experts `groups` (default: all)
    moved to frugal's names in the unfused `model` (each expert's `<group>.<e>.<proj>.weight|bias`; the
    model's weights may be on the meta device); the inverse of to_checkpoint."""
    state = dict(state)
    for g, ex in _selected(model, groups).items():
        for proj in (ex.in_proj, "down_proj"):
            for kind in ("weight", "bias") if ex.has_bias else ("weight",):
                lins = [getattr(ex.expert(e), proj) for e in range(ex.num_experts)]
                into = {e: torch.empty_like(getattr(lin, kind), device="cpu") for e, lin in enumerate(lins)}
                for part in layout(model, g, proj, bias=kind == "bias"):
                    if part.name not in state:
                        raise KeyError(part.name)
                    scatter_rows(part, state.pop(part.name), into)
                state.update({f"{g}.{e}.{proj}.{kind}": t for e, t in into.items()})
    return state


def quantized_from_checkpoint(model: nn.Module, quantized: dict[str, Any]) -> dict[str, Any]:
    """Quantized weights by checkpoint layer name (a frugal compressed-tensors directory) to frugal's expert
    names in the unfused `model`: each expert's rows put together from its checkpoint tensors."""
    groups = expert_groups(model)
    out = {n: qw for n, qw in quantized.items()}
    for g, ex in groups.items():
        for proj in (ex.in_proj, "down_proj"):
            parts = [p for p in layout(model, g, proj) if p.name.removesuffix(".weight") in out]
            if not parts or not all(p.single_expert is not None for p in parts):
                continue
            rows = getattr(ex.expert(0), proj).out_features
            by_expert: dict[int, list[Part]] = {}
            for p in parts:
                by_expert.setdefault(p.single_expert, []).append(p)
            for e, mine in by_expert.items():
                pieces = [(p.row, out.pop(p.name.removesuffix(".weight"))) for p in mine]
                first = pieces[0][1]

                def field(get):  # (rows, ...) of one field, each part's rows in place
                    t = torch.empty((rows, *get(first).shape[1:]), dtype=get(first).dtype)
                    for r, qw in pieces:
                        t[r] = get(qw)
                    return t

                zp = None if first.zero_point is None else field(lambda q: q.zero_point)
                out[f"{g}.{e}.{proj}"] = replace(first, q=field(lambda q: q.q), scale=field(lambda q: q.scale),
                                                 zero_point=zp)
    return out
