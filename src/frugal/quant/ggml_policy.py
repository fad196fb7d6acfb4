"""Which GGML type each tensor gets under a llama.cpp file type ("Q4_K_M", "Q4_0", ...).

The rules follow llama.cpp's quantizer (src/llama-quant.cpp, llama_tensor_get_type) for dense
models without an importance matrix, so a frugal GGUF and `llama-quantize` of the same source use
the same type per tensor and can be compared like for like:
  * the output head (or the token embedding when it is tied to the head) gets Q6_K, or Q8_0 when its
    row length is not a multiple of the file type's block size;
  * Q4_K_M / Q5_K_M give attn_v and ffn_down Q6_K in the first and last eighth of the layers and in
    every third layer between; Q4_K_S gives the first four attn_v and the first eighth of ffn_down Q5_K;
  * a tensor whose rows are not a multiple of 256 falls back from a K type to a 32-block type
    (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).
Mixture-of-experts, Falcon and 70B special cases, and the 2/3-bit and IQ mixtures are not covered.
"""

from __future__ import annotations

from frugal.errors import FrugalError
from frugal.quant.ggml import TYPES

# file type -> (default tensor type, value of general.file_type (llama_ftype))
FILE_TYPES: dict[str, tuple[str, int]] = {
    "Q8_0": ("Q8_0", 7), "Q4_0": ("Q4_0", 2), "Q4_1": ("Q4_1", 3), "Q5_0": ("Q5_0", 8), "Q5_1": ("Q5_1", 9),
    "Q4_K_S": ("Q4_K", 14), "Q4_K_M": ("Q4_K", 15), "Q5_K_S": ("Q5_K", 16), "Q5_K_M": ("Q5_K", 17),
    "Q6_K": ("Q6_K", 18),
}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# Hugging Face linear name (last component) -> llama.cpp tensor category
CATEGORY = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "qkv_proj": "attn_qkv", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
    "gate_up_proj": "ffn_up", "lm_head": "output", "embed_tokens": "token_embd",
}


def check_file_type(file_type: str) -> None:
    if file_type not in FILE_TYPES:
        raise FrugalError(f"--gguf-type {file_type}: supported file types are {', '.join(FILE_TYPES)}")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixtures."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category_type(file_type: str, category: str, i_layer: int, n_layers: int, tied: bool, ncols: int) -> str:
    default = FILE_TYPES[file_type][0]
    if category == "output" or (tied and category == "token_embd"):
        if ncols % TYPES[default].block:
            return "Q8_0"
        return default if default == "Q8_0" else "Q6_K"
    if category == "attn_v":
        if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layers):
            return "Q6_K"
        if file_type == "Q4_K_S" and i_layer < 4:
            return "Q5_K"
    if category == "ffn_down":
        if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layers):
            return "Q6_K"
        if file_type == "Q4_K_S" and i_layer < n_layers // 8:
            return "Q5_K"
    if category == "attn_qkv":
        return {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(file_type, default)
    return default


def tensor_type(file_type: str, category: str, i_layer: int, n_layers: int, tied: bool, ncols: int) -> str:
    """GGML type of one 2-D tensor with rows of `ncols` weights (after llama.cpp's shape fallback)."""
    check_file_type(file_type)
    t = _category_type(file_type, category, i_layer, n_layers, tied, ncols)
    if ncols % TYPES[t].block:
        t = FALLBACK.get(t, t)
    if ncols % TYPES[t].block:
        raise FrugalError(f"{category} rows of {ncols} weights fit no GGML block type (need a multiple of 32)")
    return t


def layer_type(file_type: str, name: str, n_layers: int, tied: bool, ncols: int) -> str:
    """GGML type for a Hugging Face module `name` (e.g. model.layers.3.mlp.down_proj)."""
    parts = name.split(".")
    category = CATEGORY.get(parts[-1], "other")
    i_layer = next((int(p) for p in parts if p.isdigit()), 0)
    return tensor_type(file_type, category, i_layer, n_layers, tied, ncols)
