"""Helpers shared by the peer runners (imported inside each peer's own virtualenv: torch,
transformers and safetensors only, no frugal).

A runner is called as
    python run_<peer>.py --model SRC --orig ORIG --calib CALIB --out OUT --bits 4 --group 64 [...]
SRC is the float model as every library's transformers can read it, ORIG the original directory
(its config and tokenizer are copied into the output), CALIB a safetensors file holding `input_ids`
(N, L). It writes OUT/deq (the peer's weights dequantized to float32, a plain HF directory),
optionally OUT/saved (the peer's own quantized format) and OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "special_tokens_map.json")
CHECK_TOKENS = 128  # tokens of the first calibration sample used for logit checks


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--model", required=True, help="float model directory readable by this venv's transformers")
    ap.add_argument("--orig", required=True, help="original model directory (config/tokenizer copied from it)")
    ap.add_argument("--calib", required=True, help="safetensors file with input_ids (N, L)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--method", default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--asym", action="store_true", help="asymmetric grid (zero point per group) where the peer has one")
    ap.add_argument("--nsamples", type=int, default=None,
                    help="use only the first N calibration sequences (default: all of --calib)")
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra keyword argument for the library's call (VALUE read as JSON, else a string)")
    return ap


def extra_kwargs(pairs: list[str]) -> dict:
    """--kw KEY=VALUE pairs as a dict, each VALUE parsed as JSON (true, 4, 0.5) or kept as a string."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--kw {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class Run:
    """Timing, result bookkeeping and the common checks of one runner invocation."""

    def __init__(self, args, library: str):
        self.args = args
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        self.result: dict = {"library": library, "argv": sys.argv[1:], "notes": [], "threads": torch.get_num_threads()}
        torch.manual_seed(0)

    # -- inputs
    def calib(self) -> torch.Tensor:
        from safetensors.torch import load_file

        ids = load_file(self.args.calib)["input_ids"].long()
        self.result["calibration"] = {"num_samples": ids.shape[0], "seq_len": ids.shape[1]}
        return ids

    def calib_subset(self, ids: torch.Tensor) -> torch.Tensor:
        """The first --nsamples calibration sequences (all without it), recorded as the calibration used."""
        n = min(self.args.nsamples or ids.shape[0], ids.shape[0])
        self.result["calibration_used"] = {"num_samples": n, "seq_len": ids.shape[1]}
        return ids[:n]

    def load_float(self):
        import transformers

        kw = {"dtype": torch.float32} if _tf_major() >= 5 else {"torch_dtype": torch.float32}
        model = transformers.AutoModelForCausalLM.from_pretrained(self.args.model, **kw)
        model.eval()
        return model

    def tokenizer(self):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(self.args.model)

    def float_model(self):
        """(calibration ids, float model), the float model's log-probs saved for the parent's checks: the
        start every runner shares (for calibration-free peers the ids only feed those logit checks)."""
        ids = self.calib()
        model = self.load_float()
        self.save_float_logits(model, ids)
        return ids, model

    @torch.no_grad()
    def save_float_logits(self, model, ids: torch.Tensor) -> None:
        """Log-probs of the untouched float model on a fixed window (the parent compares them with its own)."""
        from safetensors.torch import save_file

        lp = _logprobs(model, ids[:1, :CHECK_TOKENS])
        save_file({"logprobs": lp.contiguous()}, str(self.out / "float-logprobs.safetensors"))

    # -- timing
    def time(self, name: str):
        run = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                run.result[f"{name}_seconds"] = time.perf_counter() - self.t

        return _T()

    def note(self, text: str) -> None:
        self.result["notes"].append(text)

    # -- outputs
    def write_dequantized(self, weights: dict[str, torch.Tensor]) -> Path:
        """OUT/deq: the original tensors with each quantized linear's weight replaced by `weights[name]`."""
        from safetensors.torch import load_file, save_file

        orig = Path(self.args.orig)
        state = load_file(str(orig / "model.safetensors"))
        replaced = 0
        for name, w in weights.items():
            key = f"{name}.weight"
            if key not in state:
                raise KeyError(f"{key}: not a tensor of the original model")
            w = w.detach().to(torch.float32).cpu().contiguous()
            if tuple(w.shape) != tuple(state[key].shape):
                raise ValueError(f"{key}: dequantized shape {tuple(w.shape)} != original {tuple(state[key].shape)}")
            if not torch.isfinite(w).all():
                raise ValueError(f"{key}: dequantized weight has non-finite values")
            state[key] = w
            replaced += 1
        deq = self.out / "deq"
        deq.mkdir()
        save_file(state, str(deq / "model.safetensors"), metadata={"format": "pt"})
        for f in COPY_FILES:
            if (orig / f).is_file():
                shutil.copy2(orig / f, deq / f)
        self.result["replaced_linears"] = replaced
        return deq

    def finish_unsaved(self, model, ids: torch.Tensor, weights: dict[str, torch.Tensor], n_weights: int,
                       n_groups: int, zeros: bool, note: str, in_memory: int | None = None) -> None:
        """The end of a peer that writes no saved format: OUT/deq, its bytes computed from the codes, scales
        and (`zeros`) zero points, what its tensors took in memory where known, `note`, and the check of
        its own quantized `model` against OUT/deq."""
        self.write_dequantized(weights)
        self.result["computed_bytes"] = codes_bytes(n_weights, n_groups, self.args.bits, zeros)
        if in_memory is not None:
            self.result["in_memory_bytes"] = in_memory
        self.result["symmetric"] = not zeros
        self.note(note)
        self.native_check(model, ids)

    def write_model_state(self, model) -> Path:
        """OUT/deq: the whole model's state (float32) and its config, for recipes that change tensors
        besides the linears (folded scales, rotated embeddings, an untied head)."""
        from safetensors.torch import save_file

        orig = Path(self.args.orig)
        deq = self.out / "deq"
        deq.mkdir()
        state = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{bad[0]}: non-finite values in the compressed model")
        save_file(state, str(deq / "model.safetensors"), metadata={"format": "pt"})
        for f in COPY_FILES:
            if (orig / f).is_file():
                shutil.copy2(orig / f, deq / f)
        cfg = json.loads((deq / "config.json").read_text())
        cfg["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
        (deq / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        self.result["replaced_linears"] = len(decoder_linears(model))
        self.result["whole_state"] = True
        return deq

    @torch.no_grad()
    def native_check(self, native_model, ids: torch.Tensor) -> None:
        """Compare the peer's own quantized model (its modules and kernels) with OUT/deq on one window."""
        try:
            import transformers

            kw = {"dtype": torch.float32} if _tf_major() >= 5 else {"torch_dtype": torch.float32}
            deq = transformers.AutoModelForCausalLM.from_pretrained(str(self.out / "deq"), **kw).eval()
            x = ids[:1, :CHECK_TOKENS]
            a, b = _logprobs(native_model, x), _logprobs(deq, x)
            self.result["native_check"] = {
                "tokens": x.shape[1],
                "max_abs_logprob_diff": (a - b).abs().max().item(),
                "mean_abs_logprob_diff": (a - b).abs().mean().item(),
                "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            }
        except Exception as e:  # the check is informative; a failure here is recorded, not fatal
            self.result["native_check"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}

    def finish(self, **fields) -> None:
        self.result.update(fields)
        self.result["total_seconds"] = time.perf_counter() - self.t0
        self.result["self_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (self.out / "result.json").write_text(json.dumps(self.result, indent=2, default=str) + "\n")


def main(fn, doc: str, library: str) -> None:
    """Parse arguments, run `fn(run)`, and record any exception in result.json before exiting 1."""
    import signal

    ap = parser(doc)
    args, rest = ap.parse_known_args()
    if rest and library != "frugal":  # only frugal's runner reads more flags (its own recipe options)
        ap.error(f"unrecognized arguments: {' '.join(rest)}")

    def _terminated(signum, frame):
        raise SystemExit("stopped by SIGTERM (the parent's time limit)")

    signal.signal(signal.SIGTERM, _terminated)
    torch.set_num_threads(int(os.environ.get("PEER_THREADS", torch.get_num_threads())))
    run = Run(args, library)
    try:
        fn(run)
    except BaseException as e:
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        run.finish(error=f"{type(e).__name__}: {msg}", partial=True)
        sys.exit(1)
    run.finish()


def _tf_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = model(input_ids=ids.to(dev), use_cache=False)
    return torch.log_softmax(out.logits[0].float().cpu(), dim=-1)


def decoder_linears(model) -> dict[str, torch.nn.Module]:
    """name -> nn.Linear for every linear layer inside the decoder blocks (lm_head excluded)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}" and "lm_head" not in n}


def versions(*dists: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for d in ("torch", "transformers", *dists):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            pass
    return out


def codes_bytes(n_weights: int, n_groups: int, bits: int, zeros: bool) -> int:
    """Computed storage: packed codes, fp16 scales, and fp16 zero points when the grid has them."""
    return int(n_weights * bits / 8 + n_groups * 2 + (n_groups * 2 if zeros else 0))


def tensor_bytes(*tensors) -> int:
    """Bytes the given tensors hold (anything that is not a tensor, e.g. None, counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def unpack_rows(packed: torch.Tensor, bits: int, n_rows: int) -> torch.Tensor:
    """(R, C) int32 words -> (n_rows, C) codes: a little-endian bit stream down each column (GPTQ qweight
    layout; for 2/4/8 bits these are 32/bits codes per word, for 3 bits the stream crosses words)."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    r, c = w.shape
    stream = (w[:, None, :] >> torch.arange(32)[None, :, None]) & 1  # (R, 32, C)
    stream = stream.reshape(r * 32, c)[: n_rows * bits].reshape(n_rows, bits, c)
    return (stream << torch.arange(bits)[None, :, None]).sum(1)


def dequantize_gptq(tensors: dict[str, torch.Tensor], prefix: str, bits: int, in_features: int,
                    out_features: int, zero_offset: int) -> torch.Tensor:
    """(out, in) float32 weight of a GPTQ-packed linear: qweight (in*bits/32, out), qzeros (G, out*bits/32),
    scales (G, out), g_idx (in,). w = scale * (q - (z + zero_offset)); zero_offset is 1 for the v1
    ("gptq") checkpoint format, which stores zero points minus one, 0 for v2."""
    q = unpack_rows(tensors[f"{prefix}.qweight"], bits, in_features)  # (in, out)
    z = unpack_rows(tensors[f"{prefix}.qzeros"].T.contiguous(), bits, out_features).T + zero_offset  # (G, out)
    s = tensors[f"{prefix}.scales"].float()  # (G, out)
    g = tensors.get(f"{prefix}.g_idx")
    if g is None:
        g = torch.arange(in_features) // (in_features // s.shape[0])
    g = g.long()
    w = (q - z[g]).float() * s[g]  # (in, out)
    return w.T.contiguous()


def load_saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).rglob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
