"""The `frugal` command: parser, dispatch and error handling. The subcommands live beside it:
compress.py, evaluate.py (eval), export.py, analyze.py, info.py."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from frugal.analysis.budget import DEFAULT_FORMATS, DEFAULT_MEASURE, analysis_formats  # noqa: F401 (re-exported)
from frugal.cli.compress import recipe_from_args
from frugal.cli.evaluate import eval_table  # noqa: F401 (re-exported: bench/eval_report.py)
from frugal.errors import FrugalError

log = logging.getLogger("frugal")


EVAL_TOKENS = 8192  # short default budget; benchmarks pass the full budget (frugal.api.EVAL_TOKENS)


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="evaluation text (default: shared wikitext-2-raw test split)")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="first N tokens of the text (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default %(default)s)")


def _parser() -> argparse.ArgumentParser:
    from frugal.compression import methods
    from frugal.exporters import FORMATS

    format_choices = list(FORMATS)
    ap = argparse.ArgumentParser(prog="frugal", description="Compress causal language models and prove what it cost.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="quantize a model's weights and save it (compressed-tensors)")
    c.add_argument("model", nargs="?", default=None, help="model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    c.add_argument("-o", "--output", help="output directory (default: out/<model>-<method>-w<bits>g<group>)")
    c.add_argument("--recipe", help="recipe file (.yaml/.json); the options below override it (default: the "
                   "recommended recipe, AWQ scales + asymmetric GPTQ W4 g64; docs/recipes.md)")
    c.add_argument("--method", choices=methods.names(), help=methods.help_text())
    c.add_argument("--bits", type=int)
    c.add_argument("--group-size", type=int, help="32, 64, 128, or -1 for one scale per output channel")
    c.add_argument("--strict-groups", action="store_true", default=None, help="refuse a group size that does not "
                   "divide some layer's width (default: such a layer takes the largest that does, or per channel)")
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--asym", action="store_true", default=None, help="asymmetric grid (with zero points)")
    sym.add_argument("--sym", action="store_true", default=None, help="symmetric grid (the signed extreme on the "
                     "lowest code, as llama.cpp's Q4_0)")
    c.add_argument("--scale-dtype", choices=["model", "float16", "bfloat16", "float32"],
                   help="dtype the scales are stored in (default 'model': the --dtype)")
    c.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "model"],
                   help="dtype of what stays unquantized (embeddings, head, norms) in the file (default bfloat16)")
    c.add_argument("--rotate", choices=["hadamard", "random"], help="fuse an orthogonal rotation of the residual "
                   "stream (and per-head value/output) into the weights before quantizing (Llama/Mistral/Qwen/Phi-3)")
    awq = c.add_mutually_exclusive_group()
    awq.add_argument("--awq", action="store_true", default=None, help="AWQ activation-aware scaling before RTN or GPTQ")
    awq.add_argument("--no-awq", action="store_true", default=None, help="no AWQ scaling (the recommended recipe has it)")
    c.add_argument("--awq-no-clip", action="store_true", default=None,
                   help="AWQ scales without its clip search (better before GPTQ; implies --awq)")
    c.add_argument("--refine", action="store_true", default=None, help="refine the codes and group scales of each block "
                   "on its output error against the float model (SignRound-style; after RTN, HQQ or GPTQ)")
    c.add_argument("--refine-iters", type=int, help="signed-gradient steps per block for --refine (default 50)")
    c.add_argument("--refine-norms", action="store_true", default=None,
                   help="also tune each block's norm weights and biases (stored in float; implies --refine)")
    c.add_argument("--mse-clip", action="store_true", default=None, help="MSE-optimal clipping search of each group's range")
    c.add_argument("--no-act-order", action="store_true", default=None, help="GPTQ in column order instead of activation order")
    c.add_argument("--damp", type=float, help="GPTQ dampening, fraction of mean(diag H)")
    c.add_argument("--samples", type=int, help="calibration samples")
    c.add_argument("--calib-len", type=int, help="calibration sample length in tokens")
    c.add_argument("--seed", type=int)
    g = c.add_mutually_exclusive_group()
    g.add_argument("--calib", help="calibration text file (default: shared wikitext-2 valid.txt)")
    g.add_argument("--data-free", action="store_true", help="calibrate on text the model generates itself")
    c.add_argument("--format", choices=format_choices, help="output format (default compressed-tensors; gguf with --gguf-type)")
    c.add_argument("--engine", help="the engine the output must run in (vllm, vllm-cpu, llama.cpp, openvino, ...): "
                   "picks the format when --format is not given; refused before any work when it cannot run it")
    c.add_argument("--gguf-type", help="round onto a llama.cpp file type's GGML grids (Q4_0, Q4_K_M, ...); implies --format gguf")
    c.add_argument("--budget", help="mixed precision: best predicted accuracy within e.g. 3.5bpw (quantized layers, "
                   "scales included) or 200MB (whole checkpoint); runs (or reuses) `frugal analyze` first")
    c.add_argument("--max-kl", type=float, help="mixed precision: the smallest model whose predicted KL is <= this")
    c.add_argument("--candidates", default=None, help="integer formats the allocation may use "
                   "(default: the integer formats of `frugal analyze`)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (runs code from the file)")
    c.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    c.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="one decoder block in memory at a time, resumable (default: when the model does not fit)")
    c.add_argument("--no-resume", action="store_true", help="start a streamed compression over instead of resuming")
    c.add_argument("--force", action="store_true", help="run even when the pre-flight estimate says it cannot fit")
    _add_eval_options(c)

    e = sub.add_parser("eval", help="evaluate models side by side on the same tokens (results.json, report.html)")
    e.add_argument("models", nargs="+", help="model directories or .gguf files ('default' = the default model)")
    e.add_argument("--ref", help="reference model for KL divergence, top-1 agreement and per-block error")
    e.add_argument("-o", "--output", help="directory for results.json and report.html")
    e.add_argument("--json", dest="json_out", help="also write results.json to this file")
    e.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated: piqa,hellaswag")
    e.add_argument("--task-limit", type=int, default=300, help="first N items of each task (default %(default)s; 0 = all)")
    e.add_argument("--speed", action="store_true", help="prefill/decode tokens/s, TTFT, peak RSS (one process per model)")
    e.add_argument("--generate", action="store_true", help="greedy generations for a few prompts, side by side")
    e.add_argument("--full", action="store_true", help="the whole evaluation text and every task item")
    e.add_argument("--allow-pickle", action="store_true")
    _add_eval_options(e)

    x = sub.add_parser("export", help="write a compressed (compressed-tensors) directory in another format")
    x.add_argument("compressed", help="directory written by `frugal compress`")
    x.add_argument("--format", required=True, choices=format_choices)
    x.add_argument("-o", "--output", required=True, help="output directory")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    an = sub.add_parser("analyze", help="per-layer sensitivity to each candidate format (table, JSON, heat map)")
    an.add_argument("model", nargs="?", default=None)
    an.add_argument("--formats", default=DEFAULT_FORMATS, help="candidate formats (default %(default)s)")
    an.add_argument("--measure", default=DEFAULT_MEASURE,
                    help="formats whose KL is measured for every layer; the first fits each layer's amplification "
                         "(default %(default)s)")
    an.add_argument("--samples", type=int, default=4, help="calibration sequences (default %(default)s)")
    an.add_argument("--calib-len", type=int, default=128, help="tokens per sequence (default %(default)s)")
    an.add_argument("--method", choices=methods.names(), default="rtn",
                    help="how candidates are rounded: to nearest, or (methods that need Hessians) by GPTQ as the "
                         "compression will (default %(default)s)")
    an.add_argument("--hessian-samples", type=int, default=0,
                    help="with --method gptq: Hessians from N x 512 calibration tokens (default: the analysis tokens)")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--ops", action="store_true", help="instead of per-layer weight formats: round each operator "
                    "class (scores, softmax, norms, residual adds, ...) to low-precision floats and report the damage")
    an.add_argument("--ops-formats", help="float formats for --ops (default bfloat16,float16,fp8_e4m3,fp8_e5m2)")
    an.add_argument("--ops-classes", help="operator classes for --ops (default: all)")
    an.add_argument("--ops-per-block", action="store_true", help="with --ops: also per block, for the coarsest format")
    an.add_argument("-o", "--output", help="directory for analysis.json and heatmap.svg")
    an.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("info", help="architecture, parameters, layers that would be quantized, memory estimate")
    i.add_argument("model", nargs="?", default=None, help="model directory, .gguf file, or a config.json alone")
    i.add_argument("--bits", type=int, default=4)
    i.add_argument("--group-size", type=int, default=128)
    i.add_argument("--samples", type=int, default=128)
    i.add_argument("--calib-len", type=int, default=512)
    i.add_argument("--allow-pickle", action="store_true")
    i.add_argument("--project", nargs="?", const="gptq", default=None, metavar="METHOD",
                   help="also project the compression time on this machine (a method, or best; default gptq) "
                        "from one block measured at full size")
    return ap


def _command(name: str):
    """The function that runs subcommand `name` (its module is imported only when it runs)."""
    import importlib

    module, func = {"compress": ("compress", "cmd_compress"), "eval": ("evaluate", "cmd_eval"),
                    "export": ("export", "cmd_export"), "analyze": ("analyze", "cmd_analyze"),
                    "info": ("info", "cmd_info")}[name]
    return getattr(importlib.import_module(f"frugal.cli.{module}"), func)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    level = logging.DEBUG if a.verbose else logging.WARNING if a.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # our own bars say what is happening
        return _command(a.cmd)(a)
    except FrugalError as e:
        print(f"frugal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("frugal: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a write that failed outside atomic_dir (cache, checkpoint): one line, not a traceback
        from frugal.atomic import os_error_code

        code = os_error_code(e)
        if code is None:
            raise
        print(f"frugal: error: {getattr(e, 'filename', None) or 'write'}: {os.strerror(code)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
