"""GGUF for llama.cpp: architecture metadata, tokenizer and tensors in one `model.gguf`.

Tensors on a GGML grid (recipe.gguf_type) are written byte for byte as frugal rounded them. Integer
grids are carried over where a GGML type holds them: symmetric 2/3/4-bit -> Q4_0 and symmetric 8-bit
-> Q8_0 (any group size that is a multiple of 32 repeats the group's scale per 32-block; exact when
the scales are float16, `weights.scale_dtype: float16`), asymmetric 2/3-bit -> Q4_0 with codes q - z
(exact likewise), asymmetric 4-bit -> Q4_1 with m = -s (z + 8) rounded to float16 (not exact), and
asymmetric 8-bit is re-rounded onto Q8_0. Every tensor's type, exactness and relative error against
frugal's weights is recorded in frugal.json under "gguf".
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugal.errors import FrugalError
from frugal.families import FamilyRecord, family, supporting
from frugal.quant.ggml import GGMLWeight, fp16, make_grid, pack
from frugal.quant.grid import QuantizedWeight

log = logging.getLogger(__name__)

HOLDS_GGML = True  # recipe.gguf_type targets are written as GGUF
HOLDS_EXPERTS = True  # MoE experts stacked into llama.cpp's ffn_*_exps tensors (where the arch has them)

FILE_NAME = "model.gguf"


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def arch_of(model) -> FamilyRecord:
    """The family record (with its GGUF architecture, `FamilyRecord.gguf`) of the model's text config."""
    mt = _text_config(model).model_type
    record = family(mt)
    if record is None or record.gguf is None:
        raise FrugalError(f"--format gguf: architecture '{mt}' is not supported "
                          f"(supported: {', '.join(supporting('gguf'))})")
    return record


def check(model, recipe) -> None:
    """Refuse what GGUF export cannot write, before any compression work."""
    cfg = _text_config(model)
    arch = arch_of(model).gguf
    scaling = getattr(cfg, "rope_scaling", None) or {}
    for key, value in arch.requires:
        if getattr(cfg, key, value) != value:
            raise FrugalError(f"--format gguf: {cfg.model_type} with {key}={getattr(cfg, key)!r}: llama.cpp's "
                              f"{arch.arch} graph assumes {value!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in arch.rope_types:
        raise FrugalError(f"--format gguf: rope scaling '{rope_type}' of {cfg.model_type} is not supported")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch.scale_from_head_dim and cfg.query_pre_attn_scalar != head_dim:
        raise FrugalError(f"--format gguf: {cfg.model_type} query_pre_attn_scalar={cfg.query_pre_attn_scalar} differs from "
                          f"head_dim={head_dim}; llama.cpp derives the attention scale from head_dim")
    if arch.k_norm_full_width and cfg.num_key_value_heads != cfg.num_attention_heads:
        raise FrugalError(f"--format gguf: llama.cpp's {arch.arch} takes no grouped-query attention (num_key_value_heads "
                          f"{cfg.num_key_value_heads} != num_attention_heads {cfg.num_attention_heads})")
    _check_experts(model, cfg, arch)
    if not recipe.gguf_type:
        from frugal.load.blocks import quantizable_linears

        for name, lin in quantizable_linears(model, recipe.ignore).items():
            if lin.in_features % 32:
                raise FrugalError(f"--format gguf: {name} has {lin.in_features} inputs; GGML blocks need a multiple of 32")


def _check_experts(model, cfg, arch) -> None:
    """MoE: the architecture must have llama.cpp expert tensors, the routing normalisation llama.cpp's graph
    hard-codes, and a per-expert checkpoint layout (which gives the gate and up rows of `gate_up_proj`)."""
    from frugal.load.experts import expert_groups, layout, moe_layers

    if not moe_layers(model):
        return
    if arch.moe_norm_topk is None:
        raise FrugalError(f"--format gguf: MoE experts of {cfg.model_type} are not written to GGUF yet")
    norm = getattr(cfg, "norm_topk_prob", arch.moe_norm_topk)
    if bool(norm) != arch.moe_norm_topk:
        raise FrugalError(f"--format gguf: {cfg.model_type} with norm_topk_prob={norm}: llama.cpp's {arch.arch} "
                          f"graph always uses {arch.moe_norm_topk}")
    for g, ex in expert_groups(model).items():  # unfused experts only (a fused model is checked again at save)
        if ex.has_bias or not all(p.single_expert is not None for p in layout(model, g, ex.in_proj)):
            raise FrugalError(f"--format gguf: {g}: experts with biases or a fused checkpoint layout are not "
                              f"written to GGUF yet")


def _expert_tensors(model, quantized: dict, fam: FamilyRecord, cfg, names, float_type: str) -> list:
    """(GGUF name, data, raw type, record) of every stacked expert tensor: the per-expert checkpoint tensors
    (gate, up, down) of each layer stacked in expert order, (experts, out, in) -> blk.N.ffn_*_exps."""
    import gguf

    from frugal.load.experts import expert_groups, gather_rows, layout, row_slice

    out = []
    for g, ex in expert_groups(model).items():
        for proj in (ex.in_proj, "down_proj"):
            stacks: dict[str, list] = {}
            for part in layout(model, g, proj):
                e = part.single_expert
                head, _, tail = part.name.rpartition(f".{e}.")  # the expert index is the last such field
                merged = f"{head}.{tail}".removesuffix(".weight")  # experts.3.w1 -> experts.w1
                frugal_name = f"{g}.{e}.{proj}"
                lin = getattr(ex.expert(e), proj)
                qw = quantized.get(frugal_name)
                stacks.setdefault(merged, []).append(row_slice(qw, part.row) if qw is not None else
                                                     gather_rows(part, lambda _e: lin.weight.detach()))
            for merged, items in stacks.items():
                name = names.get_name(merged)
                if name is None:
                    raise FrugalError(f"--format gguf: no GGUF name for the experts {merged}")
                name += ".weight"
                if isinstance(items[0], torch.Tensor):
                    t = torch.stack([x.float() for x in items])  # (experts, out, in)
                    data = t.to(torch.float16) if float_type == "F16" else t
                    out.append((name, data.numpy(), None, {"type": float_type, **_rel(data, t)}))
                    continue
                gws = [_as_ggml(qw) for qw in items]
                record = {"type": gws[0].type, **_rel(torch.stack([gw.dequantize() for gw in gws]),
                                                       torch.stack([qw.dequantize() for qw in items]))}
                data = np.stack([pack(gw) for gw in gws])  # (experts, out, bytes per row)
                out.append((name, data, getattr(gguf.GGMLQuantizationType, gws[0].type), record))
    return out


# -- integer grids onto GGML types -----------------------------------------------------------------

def from_int_grid(qw: QuantizedWeight) -> GGMLWeight:
    """The GGML weight that carries an integer-grid weight (see the module docstring)."""
    out_f, in_f = qw.q.shape
    gs = in_f if qw.group_size == -1 else qw.group_size
    s = fp16(qw.scale.float().repeat_interleave(gs // 32, dim=1))  # (out, in / 32)
    q, z = qw.q.to(torch.int16), qw.zero_point
    if z is not None:
        z = z.to(torch.int16).repeat_interleave(gs, dim=1)
    if qw.bits == 8 and z is not None:
        return make_grid(qw.dequantize(), "Q8_0")
    if z is None or qw.bits <= 3:
        codes = q if z is None else q - z  # |q - z| <= 7 for 3-bit grids
        kind = "Q8_0" if qw.bits == 8 else "Q4_0"
        return GGMLWeight(kind, codes.to(torch.int8), s, None, {"d": s.to(torch.float16)})
    zs = qw.zero_point.float().repeat_interleave(gs // 32, dim=1)  # asymmetric 4-bit -> Q4_1
    m = fp16(-qw.scale.float().repeat_interleave(gs // 32, dim=1) * (zs + 8))
    return GGMLWeight("Q4_1", (q + 8).to(torch.int8), s, m, {"d": s.to(torch.float16), "m": m.to(torch.float16)})


def _as_ggml(w: QuantizedWeight | GGMLWeight) -> GGMLWeight:
    return w if isinstance(w, GGMLWeight) else from_int_grid(w)


def _permute_rows(n_heads: int, rows: int) -> torch.Tensor:
    """Row order llama.cpp's rotary embedding expects for q/k (pairs interleaved per head)."""
    half = rows // n_heads // 2
    return torch.arange(rows).reshape(n_heads, 2, half).transpose(1, 2).reshape(-1)


def _qkv_rows(cfg, arch, rows: int) -> torch.Tensor:
    """Row order llama.cpp expects of a fused qkv stored in key/value groups (GGUFArch.qkv_grouped): every
    group's query rows, then every key row, then every value row."""
    n_head = cfg.num_attention_heads
    n_kv = arch.kv_heads(cfg) if arch.kv_heads else n_head
    groups = torch.arange(rows).reshape(n_kv, n_head // n_kv + 2, -1)  # (kv groups, q heads + k + v, head_dim)
    return torch.cat([groups[:, :-2].reshape(-1), groups[:, -2].reshape(-1), groups[:, -1].reshape(-1)])


def _take_rows(gw: GGMLWeight, idx: torch.Tensor) -> GGMLWeight:
    return GGMLWeight(gw.type, gw.q[idx], gw.scale[idx], None if gw.offset is None else gw.offset[idx],
                      {k: v[idx] for k, v in gw.fields.items()})


# -- tensors -----------------------------------------------------------------------------------------

def _rel(stored: torch.Tensor, ref: torch.Tensor) -> dict:
    err = float((stored.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    return {"exact": err == 0.0, "rel_error": err}


def _gguf_tensor(hf_name: str, t: torch.Tensor, qw, fam: FamilyRecord, cfg,
                 float_type: str = "F16") -> tuple[np.ndarray, Any, dict]:
    """(data, raw GGML type or None for a plain float array, record) of one state-dict tensor; the
    record gives the stored type and its error against frugal's weights (before any row reordering)."""
    import gguf

    module = hf_name.rsplit(".", 1)[0]
    idx = None
    if fam.gguf.permute_qk and module.endswith(("q_proj", "k_proj")):
        heads = cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads
        idx = _permute_rows(heads, t.shape[0])
    elif fam.gguf.qkv_grouped and module.endswith(fam.gguf.qkv_grouped):
        idx = _qkv_rows(cfg, fam.gguf, t.shape[0])
    if qw is not None:
        gw = _as_ggml(qw)
        record = {"type": gw.type, **_rel(gw.dequantize(), qw.dequantize())}
        gw = gw if idx is None else _take_rows(gw, idx)
        return pack(gw), getattr(gguf.GGMLQuantizationType, gw.type), record
    t = t.detach().float()
    half = t.ndim >= 2 and float_type == "F16"
    data = t.to(torch.float16) if half else t
    record = {"type": "F16" if half else "F32", **_rel(data, t)}
    if idx is not None:
        data = data[idx]
    if fam.norm.offset and hf_name.endswith("norm.weight"):
        data = data + fam.norm.offset  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w
    return data.numpy(), None, record


def _tensors(model, quantized: dict, fam: FamilyRecord, cfg,
             float_type: str = "F16") -> list[tuple[str, np.ndarray, Any, dict]]:
    """(GGUF name, data, raw type, record for frugal.json) for every tensor of the model."""
    import gguf

    from frugal.exporters.hf import dedupe_tied

    from frugal.load.experts import expert_groups, is_expert_layer
    from frugal.load.linears import linear_layout

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, fam.gguf.arch.upper()), cfg.num_hidden_layers)
    groups = expert_groups(model)
    out = _expert_tensors(model, quantized, fam, cfg, names, float_type) if groups else []
    for hf_name, t in dedupe_tied(dict(model.state_dict())).items():
        if groups and is_expert_layer(hf_name.rsplit(".", 1)[0], groups):
            continue  # stacked above
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None and fam.gguf.strip_prefix:
            name = names.get_name(hf_name.removeprefix(fam.gguf.strip_prefix), try_suffixes=(".weight", ".bias"))
        if name is not None and ".ffn_gate_inp" in name:  # routers stay float32, as llama.cpp's converter keeps them
            out.append((name, t.detach().float().numpy(), None, {"type": "F32", "exact": True, "rel_error": 0.0}))
            continue
        if name is None:
            raise FrugalError(f"--format gguf: no GGUF name for tensor {hf_name}")
        qw = quantized.get(hf_name.rsplit(".", 1)[0]) if hf_name.endswith(".weight") else None
        t = linear_layout(model, hf_name, t)  # a Conv1D's (in, out) state-dict tensor as llama.cpp's (out, in)
        out.append((name, *_gguf_tensor(hf_name, t, qw, fam, cfg, float_type)))
    return out


# -- metadata ------------------------------------------------------------------------------------

def _rope_theta(cfg, layer_type: str = "full_attention") -> float:
    if getattr(cfg, "rope_theta", None) is not None:
        return float(cfg.rope_theta)
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    return float(params.get("rope_theta", 10000.0))


def _rotary_fraction(cfg) -> float:
    """The share of each head's dimensions that rotary embedding turns (partial rotary: Phi-2, StableLM, NeoX)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    for value in (params.get("partial_rotary_factor") if isinstance(params, dict) else None,
                  getattr(cfg, "partial_rotary_factor", None), getattr(cfg, "rotary_pct", None)):
        if value is not None:
            return float(value)
    return 1.0


def _add_hparams(w, cfg, fam: FamilyRecord) -> None:
    """The architecture block of the GGUF header, from the Hugging Face config."""
    arch = fam.gguf.arch
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "seq_length", None)
                         or 2048)  # BLOOM (ALiBi) has no position limit in its config
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    ffn = next((getattr(cfg, k) for k in ("intermediate_size", "ffn_hidden_size", "n_inner") if getattr(cfg, k, None)),
               4 * cfg.hidden_size)  # Falcon: ffn_hidden_size; GPT-2: n_inner, None meaning 4 * hidden
    w.add_feed_forward_length(ffn)
    w.add_head_count(cfg.num_attention_heads)
    kv = fam.gguf.kv_heads(cfg) if fam.gguf.kv_heads else getattr(cfg, "num_key_value_heads", None)
    w.add_head_count_kv(kv or cfg.num_attention_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(_rotary_fraction(cfg) * head_dim))
    w.add_rope_freq_base(_rope_theta(cfg))
    if fam.norm.kind == "layer":
        w.add_layer_norm_eps(next((getattr(cfg, k) for k in ("norm_epsilon", "layer_norm_eps", "layer_norm_epsilon",
                                                              "rms_norm_eps") if getattr(cfg, k, None) is not None),
                                  1e-5))  # OLMo's parameter-free LayerNorm: 1e-5, fixed
    else:
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "use_parallel_residual", None) is not None:  # GPT-NeoX, StableLM
        w.add_parallel_residual(bool(cfg.use_parallel_residual))
    if getattr(cfg, "clip_qkv", None) is not None:  # OLMo
        w.add_clamp_kqv(float(cfg.clip_qkv))
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    if arch == "granite":  # Granite's multipliers, which llama.cpp's granite graph applies
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    n_experts = next((getattr(cfg, k) for k in ("num_local_experts", "num_experts") if getattr(cfg, k, None)), None)
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        w.add_rope_freq_base_swa(_rope_theta(cfg, "sliding_attention"))
    elif getattr(cfg, "sliding_window", None) and arch == "llama":
        log.warning("sliding_window=%s is not stored in GGUF llama metadata; llama.cpp attends to the full context",
                    cfg.sliding_window)


def _copy_tokenizer(w, source: Path) -> None:
    """Copy the tokenizer.* keys of a source GGUF file unchanged."""
    from gguf import GGUFReader, GGUFValueType

    for key, f in GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)


def _add_tokenizer(w, tokenizer, n_vocab: int, pre: str) -> None:
    """Vocabulary, scores, token types, merges and special tokens from a Hugging Face tokenizer; `pre`
    is the family's tokenizer.ggml.pre, written for BPE tokenizers."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        vocab = None
        for cls in (SentencePieceVocab, LlamaHfVocab, BpeVocab):
            try:
                vocab = cls(Path(d))
                break
            except (FileNotFoundError, TypeError, KeyError, ValueError):
                continue
        if vocab is None:
            raise FrugalError("--format gguf: the tokenizer is neither SentencePiece nor BPE; cannot write its vocabulary")
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text), scores.append(score), types.append(ttype)
        for i in range(len(tokens), n_vocab):  # the embedding may have more rows than the tokenizer
            tokens.append(f"[PAD{i}]".encode()), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens[:n_vocab])
        w.add_token_scores(scores[:n_vocab])
        w.add_token_types(types[:n_vocab])
        SpecialVocab(Path(d), load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def _file_type(gguf_type: str, records: list[dict]) -> int:
    from frugal.quant.ggml_policy import FILE_TYPES

    if gguf_type:
        return FILE_TYPES[gguf_type][1]
    quant = [r["type"] for r in records if r["type"] not in ("F16", "F32")]
    common = max(set(quant), key=quant.count) if quant else "F16"
    return {"F32": 0, "F16": 1, **{k: v[1] for k, v in FILE_TYPES.items()}}[common]


def _tensor_order(item) -> tuple[int, str]:
    """llama-quantize's order: tensors outside the blocks first, then block by block, by name within."""
    parts = item[0].split(".")
    return (int(parts[1]) if parts[0] == "blk" else -1, item[0])


def write_gguf(path: Path, model, tokenizer, quantized: dict, source: str = "", gguf_type: str = "",
               float_type: str = "F16") -> dict[str, dict]:
    """Write one GGUF file; float 2-D tensors as `float_type` (F16 or F32). Returns the per-tensor record."""
    import gguf

    import copy

    from frugal.load.experts import is_fused_experts
    from frugal.load.linears import as_linears, is_conv1d

    cfg = _text_config(model)
    fam = arch_of(model)
    if any(is_fused_experts(m) or is_conv1d(m) for m in model.modules()):  # per-expert / (out, in) tensors
        model = copy.deepcopy(model)  # on a copy: the caller's model keeps its layout (save_pretrained needs it)
        as_linears(model)
    tensors = sorted(_tensors(model, quantized, fam, cfg, float_type), key=_tensor_order)
    w = gguf.GGUFWriter(str(path), fam.gguf.arch)
    w.add_name(Path(source).stem or "model")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(_file_type(gguf_type, [r for *_, r in tensors]))
    _add_hparams(w, cfg, fam)
    if source.endswith(".gguf") and Path(source).is_file():
        _copy_tokenizer(w, Path(source))
    elif tokenizer is not None:
        _add_tokenizer(w, tokenizer, cfg.vocab_size, fam.gguf.tokenizer_pre)
    for name, data, raw, _ in tensors:
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {name: r for name, _, _, r in tensors}


def write(compressed, directory: Path) -> None:
    """Write `directory/model.gguf` and frugal.json (with the per-tensor GGUF record)."""
    recipe = compressed.report.recipe
    records = write_gguf(Path(directory) / FILE_NAME, compressed.model, compressed.tokenizer, compressed.quantized,
                         str(compressed.report.source), recipe.gguf_type)
    report = compressed.report.to_dict()
    report["gguf"] = {"file": FILE_NAME, "tensors": records}
    (Path(directory) / "frugal.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def engines(recipe: Any, out: str) -> list:
    """Where a GGUF file runs, with the command."""
    from frugal.exporters import Engine

    return [Engine("llama.cpp", "llama.cpp", f"llama-cli -m {out}/model.gguf"),
            Engine("llama.cpp", "llama.cpp server", f"llama-server -m {out}/model.gguf"),
            Engine("ollama", "Ollama", f"echo 'FROM {out}/model.gguf' > Modelfile && ollama create m -f Modelfile"),
            Engine("frugal", "frugal", f"frugal eval {out}/model.gguf --ref MODEL")]
