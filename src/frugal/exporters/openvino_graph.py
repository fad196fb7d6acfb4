"""The decoder graph of `--format openvino`, built op by op with `openvino.opset13` (no tracing),
block for block as the ONNX graph (frugal.exporters.onnx) and from the same family record
(`FamilyRecord.onnx`, `.norm`). Differences from the ONNX graph: the KV cache is internal state
(ReadValue -> Gather(beam_idx) -> Concat -> Assign per layer and part, as optimum-intel's stateful
exports), attention is one ScaledDotProductAttention op, quantized linears are the compressed-weight
pattern of frugal.exporters.openvino_weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from frugal.errors import FrugalError
from frugal.exporters.onnx import rope_tables, rotary_key, window_of
from frugal.exporters.openvino_weights import compressed_weight, float_constant
from frugal.families import FamilyRecord
from frugal.quant.grid import QuantizedWeight

INPUTS = {"input_ids": ("i64", [-1, -1]), "attention_mask": ("i64", [-1, -1]),
          "position_ids": ("i64", [-1, -1]), "beam_idx": ("i32", [-1])}


def variable_id(i: int, part: str) -> str:
    """optimum-intel's name of layer i's key or value cache variable."""
    return f"past_key_values.{i}.{part}present.{i}.{part}"


@dataclass
class Ctx:
    """What every block needs: the model's config, names, quantized weights and the graph so far."""

    cfg: Any
    family: FamilyRecord
    names: dict  # module -> its name in the model
    quantized: dict[str, QuantizedWeight]
    head_dim: int
    inputs: dict = field(default_factory=dict)  # name -> Parameter
    sinks: list = field(default_factory=list)  # Assign nodes of the KV cache
    masks: dict = field(default_factory=dict)  # sliding window (or None) -> additive mask (B, 1, S, T)
    rotary: dict = field(default_factory=dict)  # rope key -> (cos, sin) (B, 1, S, hd)
    weights: dict = field(default_factory=dict)  # (storage, shape, stride, add) -> f32 output (tied: once)

    def weight(self, name: str, t: torch.Tensor, add: float = 0.0) -> Any:
        """A float parameter (plus `add`, in float32) as an f32 value, stored once per storage."""
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), add)
        if key not in self.weights:
            self.weights[key] = float_constant(t.detach().float() + add if add else t, name)
        return self.weights[key]


def const(values: Any, dtype: Any = np.int64) -> Any:
    """A small constant (shape, axes, scalar)."""
    import openvino.opset13 as ops

    return ops.constant(np.asarray(values, dtype=dtype))


def make_inputs(c: Ctx) -> None:
    """The four Parameters, named as optimum-intel names them (tensor and friendly names)."""
    import openvino as ov
    import openvino.opset13 as ops

    for name, (kind, shape) in INPUTS.items():
        p = ops.parameter(ov.PartialShape(shape), getattr(ov.Type, kind), name=name)
        p.output(0).get_tensor().set_names({name})
        c.inputs[name] = p


# -- blocks --------------------------------------------------------------------------------------
def rms_norm(c: Ctx, x: Any, norm: torch.nn.Module) -> Any:
    """x / sqrt(mean(x^2) + eps) * (offset + w) over the last axis (OpenVINO's RMS fusion pattern)."""
    import openvino.opset13 as ops

    var = ops.reduce_mean(ops.power(x, const(2.0, np.float32)), const([-1]), keep_dims=True)  # (..., 1)
    inv = ops.divide(const(1.0, np.float32), ops.sqrt(ops.add(var, const(c.cfg.rms_norm_eps, np.float32))))
    gamma = c.weight(f"{c.names[norm]}.weight", norm.weight, c.family.norm.offset)
    return ops.multiply(ops.multiply(x, inv), gamma)


def linear(c: Ctx, x: Any, layer: torch.nn.Linear) -> Any:
    """x @ W^T (+ b): MatMul(transpose_b) on the compressed-weight pattern or on a float constant."""
    import openvino.opset13 as ops

    name = c.names[layer]
    if name in c.quantized:
        w = compressed_weight(c.quantized[name], name)
    else:
        w = c.weight(f"{name}.weight", layer.weight)  # (out, in)
    y = ops.matmul(x, w, transpose_a=False, transpose_b=True)
    if layer.bias is not None:
        y = ops.add(y, c.weight(f"{name}.bias", layer.bias))
    return y


def heads(c: Ctx, x: Any, n: int, norm: torch.nn.Module | None) -> Any:
    """(B, S, n * hd) -> (B, n, S, hd), with the per-head RMSNorm first when the family has one."""
    import openvino.opset13 as ops

    x = ops.reshape(x, const([0, 0, n, c.head_dim]), special_zero=True)  # (B, S, n, hd)
    if norm is not None:
        x = rms_norm(c, x, norm)
    return ops.transpose(x, const([0, 2, 1, 3]))


def rotate(c: Ctx, x: Any, cos: Any, sin: Any) -> Any:
    """x * cos + rotate_half(x) * sin on (B, n, S, hd); rotate_half(x) = cat(-x2, x1)."""
    import openvino.opset13 as ops

    half = c.head_dim // 2
    x1 = ops.slice(x, const([0]), const([half]), const([1]), const([-1]))
    x2 = ops.slice(x, const([half]), const([2 * half]), const([1]), const([-1]))
    rot = ops.concat([ops.negative(x2), x1], axis=-1)
    return ops.add(ops.multiply(x, cos), ops.multiply(rot, sin))


def causal_mask(c: Ctx, window: int | None) -> Any:
    """(B, 1, S, T) additive mask: 0 where query i may see key j, the float32 minimum elsewhere.
    Keys are positions 0..T-1 (T = attention_mask's length = past + S), queries the last S;
    j <= i, attention_mask[b, j] = 1 and, with a window, j > i - window (HF's sliding overlay)."""
    import openvino as ov
    import openvino.opset13 as ops

    if window in c.masks:
        return c.masks[window]
    mask = c.inputs["attention_mask"]
    s = ops.gather(ops.shape_of(c.inputs["input_ids"]), const(1), const(0))  # scalar S
    t = ops.gather(ops.shape_of(mask), const(1), const(0))  # scalar T
    keys = ops.unsqueeze(ops.range(const(0), t, const(1), "i64"), const([0]))  # (1, T)
    queries = ops.unsqueeze(ops.range(ops.subtract(t, s), t, const(1), "i64"), const([1]))  # (S, 1)
    allowed = ops.less_equal(keys, queries)  # (S, T)
    if window is not None:
        allowed = ops.logical_and(allowed, ops.greater(keys, ops.subtract(queries, const(window))))
    padding = ops.unsqueeze(ops.convert(mask, ov.Type.boolean), const([1]))  # (B, 1, T)
    allowed = ops.logical_and(allowed, padding)  # (B, S, T)
    bias = ops.select(allowed, const(0.0, np.float32), const(np.finfo(np.float32).min, np.float32))
    c.masks[window] = ops.unsqueeze(bias, const([1]))  # (B, 1, S, T)
    return c.masks[window]


def rotary(c: Ctx, rot: torch.nn.Module, key: str | None) -> tuple[Any, Any]:
    """cos and sin (B, 1, S, hd) gathered at position_ids from HF's own tables (one pair per key)."""
    import openvino.opset13 as ops

    if key not in c.rotary:
        try:
            tables = rope_tables(rot, key, c.cfg.max_position_embeddings, c.head_dim)  # (max_pos, hd / 2) each
        except FrugalError as e:
            raise FrugalError(str(e).replace("--format onnx", "--format openvino", 1)) from None
        pair = []
        for name, table in zip(("cos", "sin"), tables):
            cache = ops.constant(table, name=f"rotary.{key or 'default'}.{name}_cache")
            half = ops.gather(cache, c.inputs["position_ids"], const(0))  # (B, S, hd / 2)
            pair.append(ops.unsqueeze(ops.concat([half, half], axis=-1), const([1])))  # (B, 1, S, hd)
        c.rotary[key] = tuple(pair)
    return c.rotary[key]


def cached(c: Ctx, new: Any, i: int, part: str) -> Any:
    """Past keys or values of layer i (state, reordered by beam_idx) followed by `new`:
    (B, nkv, past + S, hd); the result is assigned back to the state."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.op.util import Variable, VariableInfo

    nkv = c.cfg.num_key_value_heads
    info = VariableInfo()
    info.variable_id = variable_id(i, part)
    info.data_type = ov.Type.f32
    info.data_shape = ov.PartialShape([-1, nkv, -1, c.head_dim])
    var = Variable(info)
    batch = ops.gather(ops.shape_of(c.inputs["input_ids"]), const([0]), const(0))  # (1,)
    empty = ops.broadcast(const(0.0, np.float32), ops.concat([batch, const([nkv, 0, c.head_dim])], axis=0))
    past = ops.gather(ops.read_value(empty, var), c.inputs["beam_idx"], const(0))  # (B, nkv, past, hd)
    full = ops.concat([past, new], axis=2)  # (B, nkv, T, hd)
    c.sinks.append(ops.assign(full, var))
    return full


def repeat_kv(c: Ctx, x: Any) -> Any:
    """(B, nkv, T, hd) -> (B, nh, T, hd): each kv head repeated over its query group (HF's repeat_kv)."""
    import openvino.opset13 as ops

    group = c.cfg.num_attention_heads // c.cfg.num_key_value_heads
    if group == 1:
        return x
    x = ops.broadcast(ops.unsqueeze(x, const([2])), const([1, 1, group, 1, 1]), broadcast_spec="BIDIRECTIONAL")
    return ops.reshape(x, const([0, c.cfg.num_attention_heads, -1, c.head_dim]), special_zero=True)


def attention(c: Ctx, x: Any, attn: torch.nn.Module, i: int, rot: torch.nn.Module) -> Any:
    """Self-attention of layer i on the normed input (B, S, H), with the layer's KV state."""
    import openvino.opset13 as ops

    cfg = c.cfg
    q_norm, k_norm = (attn.q_norm, attn.k_norm) if c.family.onnx.qk_norm else (None, None)
    q = heads(c, linear(c, x, attn.q_proj), cfg.num_attention_heads, q_norm)  # (B, nh, S, hd)
    k = heads(c, linear(c, x, attn.k_proj), cfg.num_key_value_heads, k_norm)  # (B, nkv, S, hd)
    v = heads(c, linear(c, x, attn.v_proj), cfg.num_key_value_heads, None)
    cos, sin = rotary(c, rot, rotary_key(cfg, rot, i))
    q, k = rotate(c, q, cos, sin), rotate(c, k, cos, sin)
    k, v = repeat_kv(c, cached(c, k, i, "key")), repeat_kv(c, cached(c, v, i, "value"))  # (B, nh, T, hd)
    mask = causal_mask(c, window_of(cfg, i))
    y = ops.scaled_dot_product_attention(q, k, v, mask, const(attn.scaling, np.float32))  # (B, nh, S, hd)
    y = ops.reshape(ops.transpose(y, const([0, 2, 1, 3])), const([0, 0, cfg.num_attention_heads * c.head_dim]),
                    special_zero=True)  # (B, S, nh * hd)
    return linear(c, y, attn.o_proj)


def mlp(c: Ctx, x: Any, m: torch.nn.Module) -> Any:
    """down(act(gate(x)) * up(x)); act is SiLU (Swish) or tanh-approximated GELU."""
    import openvino.opset13 as ops

    gate = linear(c, x, m.gate_proj)
    act = ops.swish(gate) if getattr(c.cfg, c.family.onnx.act_attr) == "silu" else ops.gelu(gate, "tanh")
    return linear(c, ops.multiply(act, linear(c, x, m.up_proj)), m.down_proj)


def decoder_layer(c: Ctx, x: Any, layer: torch.nn.Module, i: int, rot: torch.nn.Module) -> Any:
    """Pre-norm residual block; Gemma 3 also norms each branch's output (sandwich norms)."""
    import openvino.opset13 as ops

    f = c.family.onnx
    a = attention(c, rms_norm(c, x, layer.input_layernorm), layer.self_attn, i, rot)
    if f.attn_out_norm:
        a = rms_norm(c, a, getattr(layer, f.attn_out_norm))
    x = ops.add(x, a)
    m = mlp(c, rms_norm(c, x, getattr(layer, f.mlp_in_norm)), layer.mlp)
    if f.mlp_out_norm:
        m = rms_norm(c, m, getattr(layer, f.mlp_out_norm))
    return ops.add(x, m)


def decoder(c: Ctx, model: Any) -> Any:
    """Embedding -> blocks -> final norm -> lm_head (-> soft-cap) -> logits (B, S, vocab) f32."""
    import openvino.opset13 as ops

    base = model.base_model
    embed = base.embed_tokens
    table = c.weight(f"{c.names[embed]}.weight", embed.weight)  # (vocab, H)
    x = ops.gather(table, c.inputs["input_ids"], const(0))  # (B, S, H)
    if getattr(embed, "embed_scale", None) is not None:  # Gemma: embeddings * sqrt(H)
        x = ops.multiply(x, const(float(embed.embed_scale.to(embed.weight.dtype)), np.float32))
    for i, layer in enumerate(base.layers):
        x = decoder_layer(c, x, layer, i, base.rotary_emb)
    logits = linear(c, rms_norm(c, x, base.norm), model.lm_head)
    cap = getattr(c.cfg, "final_logit_softcapping", None)
    if cap:  # tanh(logits / cap) * cap
        capped = ops.tanh(ops.divide(logits, const(cap, np.float32)))
        logits = ops.multiply(capped, const(cap, np.float32))
    return logits
