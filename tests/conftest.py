"""Shared fixtures: the read-only `shared/` folder, tiny random models of several families, and
guards that keep tests from writing outside their temporary directories."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
# The repository is /work/main and the shared data /work/shared: `shared/` sits beside the repo.
SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "models" / "tokenizer-512"
CALIB_TEXT = SHARED / "data" / "wikitext-2" / "valid.txt"
EVAL_TEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.lf.raw"

# The tokenizer-512 ids (llama2.c TinyStories tokenizer): <unk>=0, <s>=1, </s>=2.
_TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, max_position_embeddings=1024, **_TOKEN_IDS)

# family -> (transformers config class, family-specific arguments). Every width is a multiple of
# 64 (so group sizes 32 and 64 fit) and head_dim is 16.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                      sliding_window=32)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    # Per-head q/k RMSNorm.
    "qwen3": ("Qwen3Config", dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    # Sliding window (16) shorter than the calibration and test sequences, and one sliding plus one
    # full-attention layer: the two blocks get different masks and rotary embeddings.
    "gemma3": ("Gemma3TextConfig", dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"])),
    # Fused qkv_proj and gate_up_proj.
    "phi3": ("Phi3Config", dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    # Blocks at model.decoder.layers; word_embed_proj_dim != hidden_size adds project_in/project_out
    # linears outside the blocks.
    "opt": ("OPTConfig", dict(ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=32, dropout=0.0)),
}


def read_tensors(directory: Path) -> dict:
    """Every tensor of a directory's safetensors files, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def shared_path() -> Path:
    return SHARED


def build_tiny_model(family: str, dest: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random-weight model of `family` (safetensors) plus tokenizer-512 into `dest`."""
    import torch
    import transformers

    if not TOKENIZER.is_dir():
        pytest.skip(f"{TOKENIZER}: shared tokenizer missing")
    cls_name, kwargs = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(dest)
    return dest


def dir_digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory`, by relative path."""
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "README.md").is_file():
        pytest.skip(f"{SHARED}: shared data folder not found (expected beside the repository)")
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def _test_environment(tmp_path_factory):
    """Offline, a private frugal cache, and one torch thread.

    On this 2-core machine, shared with other jobs, two OpenMP threads make each tiny matmul
    ~1000x slower (spin-waiting for a busy core); one thread keeps the suite fast. The environment
    variables are inherited by the subprocesses the tests start.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("FRUGAL_CACHE", str(tmp_path_factory.mktemp("frugal-cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    if "OMP_NUM_THREADS" not in os.environ:
        mp.setenv("OMP_NUM_THREADS", "1")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, shared) -> Callable[..., Path]:
    """`factory(family, **config_overrides)` -> a fresh model directory (session-lived)."""

    def make(family: str, seed: int = 0, **overrides: Any) -> Path:
        return build_tiny_model(family, tmp_path_factory.mktemp(f"model-{family}"), seed, **overrides)

    return make


@pytest.fixture
def tiny_model_dir(tmp_path, shared) -> Callable[..., Path]:
    """`tiny_model_dir(family, **config_overrides)` -> a fresh model directory under tmp_path."""
    count = [0]

    def make(family: str, seed: int = 0, **overrides: Any) -> Path:
        count[0] += 1
        return build_tiny_model(family, tmp_path / f"{family}-{count[0]}", seed, **overrides)

    return make


@pytest.fixture(autouse=True)
def _no_stray_files(tmp_path_factory, monkeypatch):
    """Run each test in an empty working directory and fail it if it leaves anything there
    (e.g. a default `out/` folder, a temporary directory, a log file).

    A private directory rather than the repository root: other people edit the repository while
    tests run, and their files must not fail ours.
    """
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    before = sorted(os.listdir(cwd))
    yield cwd
    after = sorted(os.listdir(cwd))
    if after != before:
        pytest.fail(f"test left stray files in the working directory {cwd}: "
                    f"{sorted(set(after) - set(before))}", pytrace=False)
