"""What frugal knows about each model family, by transformers `config.model_type`: one record each.

A `FamilyRecord` holds the facts every stage reads, grouped in sub-records:
- `norm`: the norm kind and its offset (Gemma's norms compute x_hat * (1 + w): offset 1), declared
  once here and read by AWQ folding, rotation fusing, the ONNX graph and the GGUF writer;
- `final`: the modules between the last decoder block and the output head (analysis re-runs them);
- `awq`: AWQ scaling pairs and the layers left out of the clip search;
- `rotation` (where the residual-stream rotation is fused) or `rotation_refused` (why it cannot be exact);
- `onnx`: how the ONNX graph differs from Llama's;
- `gguf`: the llama.cpp architecture, its conversions and what the format cannot take;
- `roles`: module roles for the op-sensitivity analysis that type names do not reveal;
- `blocks`: the decoder block list, where the generic rule (load.blocks.find_blocks) picks the wrong one.
A sub-record left None means the stage does not support the family. Module paths inside a block are
relative to the block. This module imports nothing from frugal (nor torch), so anything may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable


@dataclass(frozen=True)
class Norm:
    kind: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm: subtracts the mean)
    offset: float = 0.0  # the norm multiplies x_hat by (offset + w); Gemma: 1


@dataclass(frozen=True)
class ScalePair:
    """An AWQ scaling pair: the op whose output only `linears` read."""

    prev: str  # module name inside the block: a norm or a linear layer
    linears: tuple[str, ...]  # the linear layers fed by prev's output
    requires: tuple[tuple[str, Any], ...] = ()  # config (attribute, value) pairs under which it is exact


@dataclass(frozen=True)
class AWQLayout:
    pairs: tuple[ScalePair, ...]
    # Layers left out of the clip search: the output error of q and k says little about the error
    # after the q.k product and softmax (the reference AWQ code skips them for the same reason).
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")


@dataclass(frozen=True)
class RotationLayout:
    """Where one architecture keeps what the rotation touches."""

    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    attn_in: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_out: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    v_proj: str = "self_attn.v_proj"
    v_after_qk: bool = False  # values are the rows after q and k in a fused qkv_proj

    def norms_to_readers(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return ((self.attn_norm, self.attn_in), (self.mlp_norm, self.mlp_in))


@dataclass(frozen=True)
class OnnxGraph:
    """How the ONNX graph differs from Llama's (module names are HF's)."""

    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rotary (Qwen3, Gemma 3)
    attn_out_norm: str | None = None  # sandwich norm on the attention output (Gemma 3)
    mlp_in_norm: str = "post_attention_layernorm"
    mlp_out_norm: str | None = None  # sandwich norm on the MLP output (Gemma 3)
    act_attr: str = "hidden_act"  # config attribute naming the MLP activation


@dataclass(frozen=True)
class GGUFArch:
    """The llama.cpp architecture of a family and the conversions llama.cpp expects."""

    arch: str  # general.architecture, e.g. "llama", "gemma3"
    permute_qk: bool = False  # q/k rows reordered for llama.cpp's rotary embedding
    tokenizer_pre: str = "default"  # tokenizer.ggml.pre of a BPE ("gpt2") tokenizer
    rope_types: tuple[str, ...] = ("default",)  # rope scaling types llama.cpp reproduces
    # llama.cpp derives the attention scale from head_dim: the config's query_pre_attn_scalar must equal it
    scale_from_head_dim: bool = False
    # MoE: whether llama.cpp's graph for this architecture renormalises the top-k routing weights (it is
    # fixed per architecture: the config's norm_topk_prob must agree); None: experts are not written
    moe_norm_topk: bool | None = None
    # llama.cpp sizes attn_k_norm to the full hidden width (OLMoE): as many key/value heads as query heads
    k_norm_full_width: bool = False
    requires: tuple[tuple[str, Any], ...] = ()  # config (attribute, value) pairs llama.cpp's graph assumes
    # the fused qkv layer whose rows come in key/value groups, each its query heads then one key and one
    # value head (BLOOM, GPT-NeoX: one query head per group; Falcon): llama.cpp wants all q rows, then all
    # k, then all v. `kv_heads(config)` gives the groups (default: one per attention head)
    qkv_grouped: str = ""
    kv_heads: Callable[[Any], int] | None = None
    strip_prefix: str = ""  # removed from a tensor name gguf-py's name table lacks, to look it up again (BLOOM)


@dataclass(frozen=True)
class FamilyRecord:
    model_type: str
    norm: Norm = Norm()
    final: tuple[str, ...] = ("model.norm",)  # modules between the last block and the output head
    awq: AWQLayout | None = None
    rotation: RotationLayout | None = None
    rotation_refused: str = ""  # why the family cannot be rotated exactly ("" where it can)
    onnx: OnnxGraph | None = None
    gguf: GGUFArch | None = None
    roles: tuple[tuple[str, tuple[str, ...]], ...] = ()  # op-sensitivity role -> module names in a block
    blocks: str = ""  # the decoder block list's module path, where load.blocks' generic rule picks wrong


# -- the records ---------------------------------------------------------------------------------
_ATTN = ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
_VO = ScalePair("self_attn.v_proj", ("self_attn.o_proj",))
_UD = ScalePair("mlp.up_proj", ("mlp.down_proj",))
_LLAMA_AWQ = AWQLayout((_ATTN, _VO, ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _UD))
_PRE_LN = (("do_layer_norm_before", True),)  # OPT-350m normalises after the residual: no norm pairs
_POST_NORMS = ("post-attention/post-feedforward norms act on sublayer outputs before the residual add, "
               "so the residual rotation cannot be fused")
_GEMMA_NORM = Norm("rms", offset=1.0)
_LAYER_NORM = "LayerNorm subtracts the mean, which does not commute with a rotation of the residual stream"

_LLAMA = FamilyRecord("llama", awq=_LLAMA_AWQ, rotation=RotationLayout(), onnx=OnnxGraph(),
                      gguf=GGUFArch("llama", permute_qk=True))


def _falcon_kv_heads(cfg: Any) -> int:
    """Falcon's key/value heads: num_kv_heads with the new decoder, else one (multi_query) or one per head."""
    if cfg.new_decoder_architecture:
        return cfg.num_kv_heads
    return 1 if cfg.multi_query else cfg.num_attention_heads


_RECORDS = (
    _LLAMA,
    replace(_LLAMA, model_type="mistral"),
    replace(_LLAMA, model_type="qwen2", gguf=GGUFArch("qwen2", tokenizer_pre="qwen2")),
    # q_norm/k_norm act on q/k heads after q_proj/k_proj: untouched by the rotations
    replace(_LLAMA, model_type="qwen3", onnx=OnnxGraph(qk_norm=True), gguf=GGUFArch("qwen3", tokenizer_pre="qwen2")),
    # the embedding is scaled by sqrt(hidden): a scalar, it commutes with the rotation
    FamilyRecord("gemma", norm=_GEMMA_NORM, rotation=RotationLayout(), gguf=GGUFArch("gemma")),
    FamilyRecord("gemma2", norm=_GEMMA_NORM, rotation_refused=_POST_NORMS,
                 gguf=GGUFArch("gemma2", scale_from_head_dim=True)),
    FamilyRecord("gemma3", norm=_GEMMA_NORM, rotation_refused=_POST_NORMS),
    FamilyRecord("gemma3_text", norm=_GEMMA_NORM, rotation_refused=_POST_NORMS,
                 awq=AWQLayout((_ATTN, _VO, ScalePair("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                                _UD)),
                 onnx=OnnxGraph(qk_norm=True, attn_out_norm="post_attention_layernorm",
                                mlp_in_norm="pre_feedforward_layernorm", mlp_out_norm="post_feedforward_layernorm",
                                act_attr="hidden_activation"),
                 gguf=GGUFArch("gemma3", rope_types=("default", "linear"), scale_from_head_dim=True)),
    FamilyRecord("phi3", awq=AWQLayout((ScalePair("input_layernorm", ("self_attn.qkv_proj",)),
                                        ScalePair("post_attention_layernorm", ("mlp.gate_up_proj",))),
                                       no_clip=("self_attn.qkv_proj",)),
                 rotation=RotationLayout(attn_in=("self_attn.qkv_proj",), mlp_in=("mlp.gate_up_proj",),
                                         v_proj="self_attn.qkv_proj", v_after_qk=True),
                 gguf=GGUFArch("phi3")),
    FamilyRecord("opt", norm=Norm("layer"), final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
                 awq=AWQLayout((ScalePair("self_attn_layer_norm",
                                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _PRE_LN),
                                ScalePair("self_attn.v_proj", ("self_attn.out_proj",)),
                                ScalePair("final_layer_norm", ("fc1",), _PRE_LN),
                                ScalePair("fc1", ("fc2",), (("activation_function", "relu"),)))),
                 rotation_refused=_LAYER_NORM,
                 roles=(("mlp_linear", ("fc1", "fc2")), ("mlp_act", ("activation_fn",)))),
)
# GGUF-only records: llama.cpp architectures whose tensors gguf-py's name tables map from transformers'.
_NOT_LAID_OUT = "not laid out for this family"
_RECORDS += (
    FamilyRecord("olmo2", rotation_refused=_POST_NORMS, gguf=GGUFArch("olmo2")),
    FamilyRecord("granite", rotation_refused=_NOT_LAID_OUT, gguf=GGUFArch("granite", permute_qk=True)),
    FamilyRecord("starcoder2", norm=Norm("layer"), gguf=GGUFArch("starcoder2", tokenizer_pre="starcoder"),
                 rotation_refused=_LAYER_NORM),
    FamilyRecord("olmo", norm=Norm("layer"), rotation_refused=_LAYER_NORM,
                 gguf=GGUFArch("olmo", permute_qk=True, tokenizer_pre="olmo")),
    FamilyRecord("stablelm", norm=Norm("layer"), rotation_refused=_LAYER_NORM,
                 gguf=GGUFArch("stablelm", tokenizer_pre="stablelm2", requires=(("qk_layernorm", False),))),
    FamilyRecord("phi", norm=Norm("layer"), final=("model.final_layernorm",), rotation_refused=_LAYER_NORM,
                 gguf=GGUFArch("phi2", requires=(("qk_layernorm", False),))),
    FamilyRecord("gpt_neox", norm=Norm("layer"), final=("gpt_neox.final_layer_norm",), rotation_refused=_LAYER_NORM,
                 gguf=GGUFArch("gptneox", qkv_grouped="attention.query_key_value")),
    FamilyRecord("bloom", norm=Norm("layer"), final=("transformer.ln_f",), rotation_refused=_LAYER_NORM,
                 gguf=GGUFArch("bloom", tokenizer_pre="bloom", qkv_grouped="self_attention.query_key_value",
                               strip_prefix="transformer.")),
    # GLM-4: fused gate_up_proj (llama.cpp's glm4 graph splits it), sandwich norms, partial interleaved rotary
    FamilyRecord("glm4", rotation_refused=_POST_NORMS, gguf=GGUFArch("glm4", tokenizer_pre="glm4")),
    # Falcon-7B style (one key/value head) and Falcon-40B style (new_decoder_architecture: kv groups, two norms)
    FamilyRecord("falcon", norm=Norm("layer"), final=("transformer.ln_f",), rotation_refused=_LAYER_NORM,
                 gguf=GGUFArch("falcon", tokenizer_pre="falcon", qkv_grouped="self_attention.query_key_value",
                               kv_heads=_falcon_kv_heads, strip_prefix="transformer.",
                               requires=(("alibi", False), ("parallel_attn", True), ("bias", False)))),
    # GPT-2: Conv1D layers (load.linears), fused c_attn; AWQ scales what the two LayerNorms feed (GELU between
    # c_fc and c_proj does not commute with a scale)
    FamilyRecord("gpt2", norm=Norm("layer"), final=("transformer.ln_f",), rotation_refused=_LAYER_NORM,
                 awq=AWQLayout((ScalePair("ln_1", ("attn.c_attn",)), ScalePair("ln_2", ("mlp.c_fc",))),
                               no_clip=("attn.c_attn",)),
                 gguf=GGUFArch("gpt2", tokenizer_pre="gpt-2",
                               requires=(("activation_function", "gelu_new"), ("scale_attn_weights", True),
                                         ("scale_attn_by_inverse_layer_idx", False)))),
)

# MoE families with Llama's attention: AWQ scales the attention only (the MoE input also feeds the float
# router, which a folded norm scale would change).
_MOE_ATTN = AWQLayout((_ATTN, _VO))
_MOE_ROTATION = ("the residual rotation would have to be fused into every expert and the float router; "
                 "not laid out for MoE yet")
_MOE_GGUF = {"mixtral": GGUFArch("llama", permute_qk=True, moe_norm_topk=True),  # llama.cpp: llama with experts
             "qwen2_moe": GGUFArch("qwen2moe", tokenizer_pre="qwen2", moe_norm_topk=False),
             "qwen3_moe": GGUFArch("qwen3moe", tokenizer_pre="qwen2", moe_norm_topk=True),
             "olmoe": GGUFArch("olmoe", tokenizer_pre="olmo", moe_norm_topk=False, k_norm_full_width=True)}
_RECORDS += tuple(FamilyRecord(mt, awq=_MOE_ATTN, rotation_refused=_MOE_ROTATION, gguf=arch)
                  for mt, arch in _MOE_GGUF.items())
FAMILIES: dict[str, FamilyRecord] = {r.model_type: r for r in _RECORDS}


def family(model_type: str | None) -> FamilyRecord | None:
    """The record of a `config.model_type`, or None for a family frugal has no record of."""
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def supporting(facet: str) -> list[str]:
    """The model types whose record has the sub-record `facet` ("awq", "rotation", "onnx", "gguf"),
    in table order."""
    return [mt for mt, r in FAMILIES.items() if getattr(r, facet) is not None]


def final_modules() -> tuple[str, ...]:
    """Every family's modules between the last block and the head, each once, in table order."""
    return tuple(dict.fromkeys(name for r in FAMILIES.values() for name in r.final))
