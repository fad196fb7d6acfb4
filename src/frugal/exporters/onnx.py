"""ONNX for ONNX Runtime: a decoder-only graph built with `onnx.helper`, quantized linears as
`com.microsoft.MatMulNBits` holding frugal's codes, scales and zero points exactly.

Files: `model.onnx` (graph and small shape constants) + `model.onnx.data` (every weight, in graph
order), config.json, generation_config.json, tokenizer files, frugal.json. Inputs and outputs follow the optimum /
onnxruntime-genai naming:
    input_ids                    int64 (batch, seq)
    attention_mask               int64 (batch, past + seq)
    position_ids                 int64 (batch, seq)
    past_key_values.{i}.key/value float32 (batch, n_kv_heads, past, head_dim)
    logits                       float32 (batch, seq, vocab)
    present.{i}.key/value        float32 (batch, n_kv_heads, past + seq, head_dim)
Families differ only by their record in frugal.families (`FamilyRecord.onnx` and `.norm`). Layout and
limits: docs/formats-onnx.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from frugal.errors import FrugalError
from frugal.families import FamilyRecord, family, supporting
from frugal.quant.grid import QuantizedWeight

OPSET = 21
DATA_FILE = "model.onnx.data"
MAX_BLOCK = 256  # largest MatMulNBits block used for per-channel grids (ORT's 2-bit CPU kernel limit)
CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 8: 8}  # ORT's kernel has 2/4/8 bits: 3-bit codes go in 4-bit blocks
STATIC_ROPE = ("default", "linear", "llama3")  # rotary types whose tables do not depend on the sequence


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


# -- check ---------------------------------------------------------------------------------------
def _rope_types(cfg: Any) -> set[str]:
    """Every rope_type of the config (Gemma 3 has one per layer type)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    nested = params and all(isinstance(p, dict) or p is None for p in params.values())
    return {(p or {}).get("rope_type", "default") for p in (params.values() if nested else [params])}


def check_config(cfg: Any) -> FamilyRecord:
    """The family record of a transformers config, or a one-line FrugalError naming what is unsupported."""
    arch = getattr(cfg, "model_type", "?")
    record = family(arch)
    if record is None or record.onnx is None:
        raise FrugalError(f"--format onnx: architecture '{arch}' is not supported "
                          f"(supported: {', '.join(sorted(supporting('onnx')))})")
    bad_rope = sorted(_rope_types(cfg) - set(STATIC_ROPE))
    if bad_rope:
        raise FrugalError(f"--format onnx: rope_type '{bad_rope[0]}' of '{arch}' is not supported "
                          f"(supported: {', '.join(STATIC_ROPE)})")
    act = getattr(cfg, record.onnx.act_attr, None)
    if act not in ACTIVATIONS:
        raise FrugalError(f"--format onnx: activation '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(cfg, key, None):
            raise FrugalError(f"--format onnx: {key}={getattr(cfg, key)} is not supported")
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise FrugalError(f"--format onnx: partial_rotary_factor={cfg.partial_rotary_factor} is not supported")
    return record


def check(model: Any, recipe: Any) -> None:
    """Fail before any compression work when the ONNX graph cannot express `recipe` on `model`."""
    from frugal.load.blocks import quantizable_linears

    check_config(model.config)
    if recipe.weights.group_size != -1:
        return  # group sizes (32/64/128) are MatMulNBits block sizes; blocks.check_group_fit checks widths
    for name, layer in quantizable_linears(model, recipe.ignore).items():
        if layer.in_features % 16:
            raise FrugalError(f"--format onnx: per-channel grid on {name}: in_features {layer.in_features} "
                              "is not a multiple of 16 (MatMulNBits blocks are powers of two >= 16)")


# -- MatMulNBits tensors -------------------------------------------------------------------------
def block_size_of(qw: QuantizedWeight, in_features: int) -> int:
    """MatMulNBits block: the group, or for per-channel grids the largest power of two <= MAX_BLOCK
    dividing in_features (the row's one scale is then repeated over its blocks)."""
    if qw.group_size != -1:
        return qw.group_size
    block = MAX_BLOCK
    while in_features % block:
        block //= 2
    if block < 16:
        raise FrugalError(f"--format onnx: in_features {in_features} is not a multiple of 16")
    return block


def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit codes along the last axis, first code in the lowest bits of a byte."""
    per_byte = 8 // bits
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per_byte)  # (..., L / per_byte, per_byte)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):
        out |= c[..., i] << np.uint8(bits * i)
    return out


def nbits_tensors(qw: QuantizedWeight) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """MatMulNBits initializers (B, scales, zero_points) and attributes of one quantized weight.

    Codes are stored unsigned, u = q + 2^(b-1), with an explicit zero point z + 2^(b-1) (2^(b-1)
    for symmetric grids), so ORT computes (u - z_u) * s = (q - z) * s exactly.
    """
    n, k = qw.q.shape
    bits, offset = CONTAINER_BITS[qw.bits], 1 << (qw.bits - 1)
    block = block_size_of(qw, k)
    n_blocks = k // block
    repeat = n_blocks // qw.scale.shape[1]  # > 1 only for per-channel grids
    u = (qw.q.to(torch.int16) + offset).numpy().astype(np.uint8)  # (N, K)
    z = torch.zeros_like(qw.scale, dtype=torch.int16) if qw.zero_point is None else qw.zero_point.to(torch.int16)
    zu = (z + offset).numpy().astype(np.uint8).repeat(repeat, axis=1)  # (N, n_blocks)
    per_byte = 8 // bits
    zu = np.pad(zu, ((0, 0), (0, -n_blocks % per_byte)))  # (N, ceil(n_blocks * bits / 8) * per_byte)
    tensors = {
        "B": pack_low_first(u, bits).reshape(n, n_blocks, block * bits // 8),
        "scales": qw.scale.float().numpy().repeat(repeat, axis=1),  # (N, n_blocks), exact widening
        "zero_points": pack_low_first(zu, bits),  # (N, ceil(n_blocks * bits / 8))
    }
    return tensors, {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 0}


# -- graph builder -------------------------------------------------------------------------------
class Graph:
    """Nodes and initializers of one graph; initializer bytes stream into the external data file."""

    def __init__(self, data: BinaryIO):
        self.nodes: list = []
        self.inits: list = []
        self.data = data
        self.offset = 0
        self.count = 0
        self.written: dict[tuple, str] = {}  # tied tensors and repeated constants are stored once

    def init(self, name: str, array: np.ndarray, key: tuple | None = None, external: bool = True) -> str:
        """Store `array` as initializer `name` (once per `key`), in the data file unless `external`
        is False; returns the name to use."""
        from onnx import numpy_helper
        from onnx.external_data_helper import set_external_data

        if key is not None and key in self.written:
            return self.written[key]
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if external:
            raw = tensor.raw_data
            self.data.write(raw)
            set_external_data(tensor, DATA_FILE, self.offset, len(raw))
            tensor.data_location = tensor.EXTERNAL
            tensor.ClearField("raw_data")
            self.offset += len(raw)
        self.inits.append(tensor)
        if key is not None:
            self.written[key] = name
        return name

    def weight(self, name: str, t: torch.Tensor, add: float = 0.0) -> str:
        """A float32 parameter (plus `add`), stored once per storage (a tied lm_head reuses the embedding)."""
        key = ("param", t.data_ptr(), tuple(t.shape), tuple(t.stride()), add)
        return self.init(name, (t.detach().float() + add).numpy() if add else t.detach().float().numpy(), key)

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        """A small constant (shape, axes, scalar), stored once per value inside model.onnx: ONNX
        Runtime's shape inference reads shapes and axes only from inline tensors."""
        a = np.asarray(values, dtype=dtype)
        key = ("const", a.dtype.str, a.shape, a.tobytes())
        return self.init(f"const_{len(self.written)}", a, key, external=False)

    def op(self, op_type: str, *inputs: str, out: str | None = None, domain: str = "", **attrs: Any) -> str:
        """Append one single-output node; returns its output name."""
        from onnx import helper

        self.count += 1
        out = out or f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self.count}",
                                           domain=domain, **attrs))
        return out


# -- blocks --------------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What every block needs: the graph, the model's config, names and quantized weights."""

    g: Graph
    cfg: Any
    family: FamilyRecord
    names: dict  # module -> its name in the model
    quantized: dict[str, QuantizedWeight]
    head_dim: int
    masks: dict  # sliding window (or None) -> additive mask (B, 1, 1, S, T)
    rotary: dict  # rope key -> (cos, sin) (B, 1, S, head_dim)


def rms_norm(c: Ctx, x: str, norm: torch.nn.Module) -> str:
    """x / sqrt(mean(x^2) + eps) * (offset + w), over the last axis."""
    g = c.g
    name = c.names[norm]
    var = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)  # (..., 1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(c.cfg.rms_norm_eps, np.float32))))
    return g.op("Mul", g.op("Mul", x, inv), g.weight(f"{name}.weight", norm.weight, c.family.norm.offset))


def linear(c: Ctx, x: str, layer: torch.nn.Linear) -> str:
    """x @ W^T (+ b): MatMulNBits for quantized layers, MatMul with a transposed float W otherwise."""
    g, name = c.g, c.names[layer]
    if name in c.quantized:
        tensors, attrs = nbits_tensors(c.quantized[name])
        inputs = [g.init(f"{name}.{k}", v) for k, v in tensors.items()]
        y = g.op("MatMulNBits", x, *inputs, domain="com.microsoft", **attrs)
    else:
        y = g.op("MatMul", x, g.op("Transpose", g.weight(f"{name}.weight", layer.weight), perm=[1, 0]))
    if layer.bias is not None:
        y = g.op("Add", y, g.weight(f"{name}.bias", layer.bias))
    return y


def heads(c: Ctx, x: str, n: int, norm: torch.nn.Module | None) -> str:
    """(B, S, n * hd) -> (B, n, S, hd), with the per-head RMSNorm first when the family has one."""
    x = c.g.op("Reshape", x, c.g.const([0, 0, n, c.head_dim]))  # (B, S, n, hd)
    if norm is not None:
        x = rms_norm(c, x, norm)
    return c.g.op("Transpose", x, perm=[0, 2, 1, 3])


def rotate(c: Ctx, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin on (B, n, S, hd); rotate_half(x) = cat(-x2, x1)."""
    g, half = c.g, c.head_dim // 2
    axis = g.const([-1])
    x1 = g.op("Slice", x, g.const([0]), g.const([half]), axis)
    x2 = g.op("Slice", x, g.const([half]), g.const([2 * half]), axis)
    rot = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rot, sin))


def rotary_key(cfg: Any, rot: torch.nn.Module, i: int) -> str | None:
    """Which of the rotary module's tables layer i uses: its layer type where the module keeps one table
    per type (`{type}_inv_freq`, Gemma 3), else None (the one table)."""
    types = getattr(cfg, "layer_types", None)
    return types[i] if types is not None and hasattr(rot, f"{types[i]}_inv_freq") else None


def window_of(cfg: Any, i: int) -> int | None:
    """Sliding window of layer i: every layer when the config has no layer_types (Mistral), else
    the layers typed "sliding_attention" (Qwen2/3, Gemma 3). None: full causal attention."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is None or (types is not None and types[i] != "sliding_attention"):
        return None
    return window


def causal_mask(c: Ctx, window: int | None) -> str:
    """(B, 1, 1, S, T) additive mask: 0 where query i may see key j, the float32 minimum elsewhere.
    Keys are positions 0..T-1 of past + new tokens, queries the last S (HF's cache_position);
    j <= i, attention_mask[b, j] = 1 and, with a window, j > i - window (HF's sliding overlay)."""
    if window in c.masks:
        return c.masks[window]
    g = c.g
    s = g.op("Shape", "input_ids", start=1, end=2)  # (1,) = S
    t = g.op("Shape", "attention_mask", start=1, end=2)  # (1,) = T
    t0, p0 = g.op("Squeeze", t), g.op("Squeeze", g.op("Sub", t, s))  # scalars T, P = T - S
    keys = g.op("Unsqueeze", g.op("Range", g.const(0), t0, g.const(1)), g.const([0]))  # (1, T)
    queries = g.op("Unsqueeze", g.op("Range", p0, t0, g.const(1)), g.const([1]))  # (S, 1)
    allowed = g.op("LessOrEqual", keys, queries)  # (S, T)
    if window is not None:
        allowed = g.op("And", allowed, g.op("Greater", keys, g.op("Sub", queries, g.const(window))))
    padding = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1])), to=9)  # (B, 1, T) bool
    allowed = g.op("And", allowed, padding)  # (B, S, T)
    bias = g.op("Where", allowed, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32))
    c.masks[window] = g.op("Unsqueeze", bias, g.const([1, 2]))  # (B, 1, 1, S, T)
    return c.masks[window]


def rope_tables(rot: torch.nn.Module, key: str | None, max_pos: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """HF's own cos/sin for positions 0..max_pos-1 (its rotary module's forward, so the values are
    bit-identical), first half only: (max_pos, hd / 2) each."""
    pos = torch.arange(max_pos)[None]  # (1, max_pos)
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1), pos, **({"layer_type": key} if key else {}))  # (1, max_pos, hd)
    if cos.shape[-1] != head_dim:
        raise FrugalError(f"--format onnx: rotary width {cos.shape[-1]} != head_dim {head_dim} (partial rotary)")
    half = head_dim // 2
    for t in (cos, sin):
        if not torch.equal(t[..., :half], t[..., half:]):
            raise FrugalError("--format onnx: rotary tables are not in rotate_half form (cat(freqs, freqs))")
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def rotary(c: Ctx, rot: torch.nn.Module, key: str | None) -> tuple[str, str]:
    """cos and sin (B, 1, S, hd) gathered at position_ids from cached tables (one pair per key)."""
    if key not in c.rotary:
        g = c.g
        pair = []
        tables = rope_tables(rot, key, c.cfg.max_position_embeddings, c.head_dim)
        for name, table in zip(("cos", "sin"), tables):
            cache = g.init(f"rotary.{key or 'default'}.{name}_cache", table)  # (max_pos, hd / 2)
            half = g.op("Gather", cache, "position_ids", axis=0)  # (B, S, hd / 2)
            pair.append(g.op("Unsqueeze", g.op("Concat", half, half, axis=-1), g.const([1])))  # (B, 1, S, hd)
        c.rotary[key] = tuple(pair)
    return c.rotary[key]


def attend(c: Ctx, q: str, k: str, v: str, mask: str, scaling: float) -> str:
    """softmax(q k^T * scaling + mask) v -> (B, S, nh * hd). Grouped-query attention: the query heads
    of one kv head form one group, and the group axis broadcasts that kv head (HF's repeat_kv)."""
    g, hd = c.g, c.head_dim
    nh, nkv = c.cfg.num_attention_heads, c.cfg.num_key_value_heads
    q = g.op("Reshape", q, g.const([0, nkv, nh // nkv, -1, hd]))  # (B, nkv, r, S, hd)
    k = g.op("Transpose", g.op("Unsqueeze", k, g.const([2])), perm=[0, 1, 2, 4, 3])  # (B, nkv, 1, hd, T)
    v = g.op("Unsqueeze", v, g.const([2]))  # (B, nkv, 1, T, hd)
    scores = g.op("Mul", g.op("MatMul", q, k), g.const(scaling, np.float32))  # (B, nkv, r, S, T)
    y = g.op("MatMul", g.op("Softmax", g.op("Add", scores, mask), axis=-1), v)  # (B, nkv, r, S, hd)
    y = g.op("Transpose", g.op("Reshape", y, g.const([0, nh, -1, hd])), perm=[0, 2, 1, 3])  # (B, S, nh, hd)
    return g.op("Reshape", y, g.const([0, 0, nh * hd]))


def attention(c: Ctx, x: str, attn: torch.nn.Module, i: int, rot: torch.nn.Module) -> str:
    """Self-attention of layer i on the normed input (B, S, H); emits present.{i}.key/value."""
    g, cfg = c.g, c.cfg
    q_norm, k_norm = (attn.q_norm, attn.k_norm) if c.family.onnx.qk_norm else (None, None)
    q = heads(c, linear(c, x, attn.q_proj), cfg.num_attention_heads, q_norm)  # (B, nh, S, hd)
    k = heads(c, linear(c, x, attn.k_proj), cfg.num_key_value_heads, k_norm)  # (B, nkv, S, hd)
    v = heads(c, linear(c, x, attn.v_proj), cfg.num_key_value_heads, None)
    cos, sin = rotary(c, rot, rotary_key(cfg, rot, i))
    q, k = rotate(c, q, cos, sin), rotate(c, k, cos, sin)
    k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, out=f"present.{i}.key")  # (B, nkv, T, hd)
    v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, out=f"present.{i}.value")
    y = attend(c, q, k, v, causal_mask(c, window_of(cfg, i)), attn.scaling)
    return linear(c, y, attn.o_proj)


def mlp(c: Ctx, x: str, m: torch.nn.Module) -> str:
    """down(act(gate(x)) * up(x)); act is SiLU or tanh-approximated GELU."""
    g = c.g
    gate = linear(c, x, m.gate_proj)
    if getattr(c.cfg, c.family.onnx.act_attr) == "silu":
        act = g.op("Mul", gate, g.op("Sigmoid", gate))
    else:
        act = g.op("Gelu", gate, approximate="tanh")
    return linear(c, g.op("Mul", act, linear(c, x, m.up_proj)), m.down_proj)


def decoder_layer(c: Ctx, x: str, layer: torch.nn.Module, i: int, rot: torch.nn.Module) -> str:
    """Pre-norm residual block; Gemma 3 also norms each branch's output (sandwich norms)."""
    f, g = c.family.onnx, c.g
    a = attention(c, rms_norm(c, x, layer.input_layernorm), layer.self_attn, i, rot)
    if f.attn_out_norm:
        a = rms_norm(c, a, getattr(layer, f.attn_out_norm))
    x = g.op("Add", x, a)
    m = mlp(c, rms_norm(c, x, getattr(layer, f.mlp_in_norm)), layer.mlp)
    if f.mlp_out_norm:
        m = rms_norm(c, m, getattr(layer, f.mlp_out_norm))
    return g.op("Add", x, m)


def decoder(c: Ctx, model: Any) -> None:
    """Embedding -> blocks -> final norm -> lm_head -> `logits` (B, S, vocab)."""
    g, base = c.g, model.base_model
    embed = base.embed_tokens
    x = g.op("Gather", g.weight(f"{c.names[embed]}.weight", embed.weight), "input_ids", axis=0)  # (B, S, H)
    if getattr(embed, "embed_scale", None) is not None:  # Gemma: embeddings * sqrt(H)
        x = g.op("Mul", x, g.const(float(embed.embed_scale.to(embed.weight.dtype)), np.float32))
    for i, layer in enumerate(base.layers):
        x = decoder_layer(c, x, layer, i, base.rotary_emb)
    logits = linear(c, rms_norm(c, x, base.norm), model.lm_head)
    cap = getattr(c.cfg, "final_logit_softcapping", None)
    if cap:  # tanh(logits / cap) * cap
        logits = g.op("Mul", g.op("Tanh", g.op("Div", logits, g.const(cap, np.float32))), g.const(cap, np.float32))
    g.op("Identity", logits, out="logits")


# -- model and files -----------------------------------------------------------------------------
def io_values(cfg: Any, head_dim: int) -> tuple[list, list]:
    """Graph inputs and outputs with dynamic batch and sequence axes."""
    from onnx import TensorProto, helper

    def value(name: str, dtype: int, shape: list) -> Any:
        return helper.make_tensor_value_info(name, dtype, shape)

    inputs = [value("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              value("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              value("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [value("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
    for i in range(cfg.num_hidden_layers):
        for part in ("key", "value"):
            kv = ["batch_size", cfg.num_key_value_heads]  # (batch, n_kv_heads, seq, head_dim)
            inputs.append(value(f"past_key_values.{i}.{part}", TensorProto.FLOAT,
                                [*kv, "past_sequence_length", head_dim]))
            outputs.append(value(f"present.{i}.{part}", TensorProto.FLOAT, [*kv, "total_sequence_length", head_dim]))
    return inputs, outputs


def build_model(compressed: Any, data: BinaryIO) -> Any:
    """The ModelProto of `compressed`; initializer bytes are written to `data` as they are made."""
    from onnx import helper

    from frugal.version import __version__

    model = compressed.model
    record = check_config(model.config)
    c = Ctx(g=Graph(data), cfg=model.config, family=record, names={m: n for n, m in model.named_modules()},
            quantized=compressed.quantized, head_dim=model.base_model.layers[0].self_attn.head_dim,
            masks={}, rotary={})
    decoder(c, model)
    inputs, outputs = io_values(c.cfg, c.head_dim)
    graph = helper.make_graph(c.g.nodes, "frugal", inputs, outputs, c.g.inits)
    proto = helper.make_model(graph, producer_name="frugal", producer_version=__version__, ir_version=10,
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    helper.set_model_props(proto, {"frugal.onnx_format_version": "1", "frugal.model_type": c.cfg.model_type})
    return proto


def write(compressed: Any, directory: Any) -> None:
    """Write model.onnx + model.onnx.data, config, tokenizer and frugal.json into `directory`."""
    directory = Path(directory)
    model = compressed.model
    with open(directory / DATA_FILE, "wb") as data:
        proto = build_model(compressed, data)
    (directory / "model.onnx").write_bytes(proto.SerializeToString(deterministic=True))
    from frugal.exporters.hf import write_metadata

    write_metadata(model, compressed.tokenizer, directory, None)  # config.json (architectures), tokenizer
    report = json.dumps(compressed.report.to_dict(), indent=2, sort_keys=True) + "\n"
    (directory / "frugal.json").write_text(report)


def engines(recipe: Any, out: str) -> list:
    """Where an ONNX directory runs, with the command."""
    from frugal.exporters import Engine

    return [Engine("onnxruntime", "ONNX Runtime", f'frugal.exporters.onnx_runtime.OrtCausalLM("{out}").generate_greedy(ids, 32)'),
            Engine("onnxruntime", "ONNX Runtime (any language)", f"InferenceSession('{out}/model.onnx')  # com.microsoft.MatMulNBits")]
