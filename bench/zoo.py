"""Tiny random models of any transformers causal-LM family, for the family benchmark (bench/families.py) and
tests: every size attribute a config has is shrunk, and the parameter count is checked on the meta device
before any memory is allocated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_PARAMS = 30e6
SMALL: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=512, num_experts=8, num_local_experts=8, n_routed_experts=8,
    num_experts_per_tok=2, max_position_embeddings=1024, shared_expert_intermediate_size=64, n_shared_experts=1,
    first_k_dense_replace=0, n_group=1, topk_group=1, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
    d_model=64, ffn_dim=128, n_inner=128, ffn_hidden_size=128, num_layers=2, num_heads=4, kv_lora_rank=32,
    q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, attn_layer_period=2,
    attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1)
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_PATTERNS = ("layer_types", "mlp_layer_types", "layers_block_type", "attn_type_list", "hybrid_override_pattern")


def causal_families() -> list[str]:
    """Every model type transformers maps to a causal LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, drop: tuple[str, ...] = (), **over: Any) -> Any:
    """The family's default config with every size attribute it has shrunk (per-layer patterns cut to the
    layer count, keeping each kind of layer where the pattern has several)."""
    import transformers

    base = transformers.AutoConfig.for_model(model_type)
    kw = {k: v for k, v in {**SMALL, **over}.items() if hasattr(base, k) and k not in drop}
    kw.update({k: v for k, v in TOKEN_IDS.items() if hasattr(base, k)})
    try:
        return transformers.AutoConfig.for_model(model_type, **kw)
    except Exception:
        pass
    n = kw.get("num_hidden_layers", kw.get("num_layers", 2))
    for attr in _PATTERNS:
        v = getattr(base, attr, None)
        if isinstance(v, (list, tuple, str)) and len(v) >= n:
            kinds = list(dict.fromkeys(v))
            cut = (kinds + list(v))[:n] if len(kinds) <= n else list(v[:n])
            kw[attr] = "".join(cut) if isinstance(v, str) else cut
    return transformers.AutoConfig.for_model(model_type, **kw)


def build(model_type: str, dest: Path, tokenizer: Path, seed: int = 0) -> Any:
    """Save a tiny random model of `model_type` (safetensors) and `tokenizer` into `dest`; the model."""
    import torch
    import transformers

    last: Exception | None = None
    for drop in ((), ("head_dim",)):
        try:
            cfg = tiny_config(model_type, drop)
            with torch.device("meta"):
                meta = transformers.AutoModelForCausalLM.from_config(cfg)
            n = sum(p.numel() for p in meta.parameters())
            if n > MAX_PARAMS:
                raise ValueError(f"{n / 1e6:.0f}M parameters after shrinking")
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
            with torch.no_grad():
                model(torch.ones(1, 8, dtype=torch.long), use_cache=False)
            break
        except Exception as e:  # a config the shrinking broke: try the next variant
            last = e
    else:
        raise RuntimeError(f"cannot build a tiny {model_type}: {str(last).splitlines()[0][:200]}")
    model.save_pretrained(dest)
    transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(dest)
    return model
