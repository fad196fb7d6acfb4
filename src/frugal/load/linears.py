"""Every weight matrix of a model as an `nn.Linear`: the one linear kind the methods, hooks and writers know.

Two other kinds hold linear layers in transformers models: fused 3-D MoE experts (`load.experts`) and
GPT-2 style `Conv1D` (gpt2, gpt-sw3, openai-gpt: `y = x @ W + b`, W stored (in, out)). `as_linears`
replaces both in place. A Conv1D becomes a `TransposedLinear`: an nn.Linear with the usual (out, in)
weight in memory, so GPTQ, AWQ, hooks and exporters treat it like any other linear, whose state dict
keeps the checkpoint's (in, out) layout, so the writers' float tensors and the reader's load need no
per-family code. Quantized tensors are written in the linear layout (rows = outputs, as vLLM's GPT-2
loader expects of packed weights).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from frugal.load.modules import replace_modules

log = logging.getLogger(__name__)


class TransposedLinear(nn.Linear):
    """A linear layer whose checkpoint stores `weight` transposed, (in, out) (transformers' Conv1D);
    `weight` in memory is (out, in) as in every nn.Linear."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"].t()  # (in, out), a view

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key].t()  # (in, out) -> (out, in)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (weight (in, out), `nf` outputs)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def from_conv1d(conv: nn.Module) -> TransposedLinear:
    """The TransposedLinear computing what `conv` does (weight copied to (out, in); bias shared)."""
    n_in, n_out = conv.weight.shape
    lin = TransposedLinear(n_in, n_out, bias=conv.bias is not None, device="meta")
    lin.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        lin.bias = conv.bias
    return lin


def conv1d_as_linear(model: nn.Module) -> int:
    """Replace every Conv1D of `model` by a TransposedLinear (in place); how many."""
    return replace_modules(model, is_conv1d, from_conv1d)


def as_linears(model: nn.Module) -> bool:
    """Every weight matrix of `model` an nn.Linear (MoE experts unfused, Conv1D transposed), in place and
    idempotent; whether the model has MoE experts."""
    from frugal.load.experts import expert_groups, unfuse_experts

    if conv1d_as_linear(model):
        log.debug("Conv1D layers held as linear layers (weights transposed in memory)")
    unfuse_experts(model)
    return bool(expert_groups(model))


def checkpoint_layout(model: nn.Module, layer: str, weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's (out, in) `weight` in the layout its checkpoint stores (transposed for Conv1D;
    names that are not a module of `model`, such as a checkpoint's expert names, as they are)."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return weight
    return weight.t() if isinstance(module, TransposedLinear) else weight


def linear_layout(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A state-dict tensor `name` of `model` in the linear (out, in) layout (a Conv1D weight transposed back)."""
    layer, _, leaf = name.rpartition(".")
    return checkpoint_layout(model, layer, tensor) if leaf == "weight" else tensor
