"""Pre-flight: the memory and disk a compression needs, from config.json and safetensors headers only.

No weight is read. The estimate is a sum of the pieces the code holds at its peak:
    in memory (frugal.compress + save):  base + model + integer codes + the larger of
                                         (2 activation sets + Hessians + one block forward's temporaries)
                                         and (1.25 x output: the packed and cast tensors, the writer's
                                         buffers; measured 1.12 x on a 1.5B model)
    streaming (frugal.compression.stream):           base + outside pieces + 2 largest blocks + activations
                                         (2 sets in RAM; 1 set + 1 sample when the inputs are on disk)
                                         + Hessians of the largest block
plus the temporaries of quantizing the largest layer. `base` is what Python, torch and transformers
occupy before any weight (measured: ~370 MB on CPU). Weights are counted as float32, the dtype frugal
loads them in; the loaded model is counted once, since rounding writes into the loaded weights
(compression.inplace). Integer codes are one byte per weight until the writer packs them. Hessians count one float64 accumulator and one float32 copy per linear layer, an upper
bound (layers fed the same input share one accumulator). Measured against peak_rss_bytes: streaming within
10% above, in memory within 40% (tests/test_preflight.py, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugal.errors import FrugalError

BASE_BYTES = 430 * 10**6  # Python + torch + transformers + tokenizer before any weight (~370-400 MB measured)
LOADER_BYTES = 80 * 10**6  # in memory: what transformers' from_pretrained keeps beside the weights (measured 50-80 MB)
HEADER_LIMIT = 100 * 2**20  # safetensors refuses headers above 100 MB too
FLOAT_BYTES = 4  # weights and activations are float32 in frugal
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# safetensors dtype code by torch dtype name: the one table (load.lazy and compression.workdir build theirs from it)
DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
               "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors checkpoint, as its header describes it."""

    dtype: str
    shape: tuple[int, ...]
    file: str  # file name inside the model directory
    offsets: tuple[int, int]  # data byte range after the header

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (without `__metadata__`) and where its data starts."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > HEADER_LIMIT:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise FrugalError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def checkpoint_tensors(directory: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a model directory (one safetensors file, or shards listed by an index)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FrugalError(f"{directory}: no *.safetensors weights")
    out: dict[str, TensorInfo] = {}
    for name in files:
        header, _ = read_header(directory / name)
        for key, h in header.items():
            out[key] = TensorInfo(h["dtype"], tuple(h["shape"]), name, tuple(h["data_offsets"]))
    return out


def block_list(names: list[str]) -> tuple[str, int]:
    """(prefix, count) of the longest numbered list of tensors: the decoder blocks, e.g. ('model.layers', 30)."""
    indices: dict[str, set[int]] = {}
    for n in names:
        m = re.match(r"^(.*?)\.(\d+)\.", n)
        if m:
            indices.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not indices:
        raise FrugalError("checkpoint: no numbered list of decoder blocks among the tensor names")
    prefix = max(indices, key=lambda p: len(indices[p]))
    return prefix, len(indices[prefix])


def _text_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FrugalError(f"{path}: unreadable ({e})") from None
    return cfg.get("text_config") or cfg


def _hidden_size(cfg: dict[str, Any], directory: Path) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "word_embed_proj_dim"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise FrugalError(f"{directory / 'config.json'}: no hidden_size (or d_model, n_embd)")


@dataclass(frozen=True)
class Estimate:
    """Bytes a compression job needs; `peak_ram_bytes` and `disk_bytes` are those of streaming."""

    model_bytes: int  # every tensor as float32
    block_bytes: int  # the largest decoder block as float32
    outside_bytes: int  # embeddings, final norm, head: what stays in memory while streaming
    n_blocks: int
    activation_bytes: int  # one set of block inputs, (n, seq, hidden) float32; 0 without calibration
    hessian_bytes: int  # GPTQ accumulators of the largest block; 0 for RTN
    output_bytes: int  # the compressed-tensors checkpoint
    in_memory_ram_bytes: int  # frugal.compress + save
    peak_ram_bytes: int  # streaming with the activations in RAM
    offload_ram_bytes: int  # streaming with the block inputs on disk (the outputs of one block in RAM)
    disk_bytes: int  # streaming: output + work directory (two activation sets)

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) lines for `frugal info`."""
        return [("compression peak RAM, in memory (estimate)", self.in_memory_ram_bytes),
                ("compression peak RAM, streaming (estimate)", self.peak_ram_bytes),
                ("  with activations offloaded to disk", self.offload_ram_bytes),
                ("disk for output + streaming work (estimate)", self.disk_bytes)]


def _quantized(name: str, t: TensorInfo, in_block: bool, ignore: tuple[str, ...]) -> bool:
    """Would frugal quantize this tensor? (2-D float weights of linear layers; embeddings stay float)."""
    from frugal.load.blocks import is_ignored

    if len(t.shape) != 2 or not t.is_float or not name.endswith(".weight"):
        return False
    layer = name[: -len(".weight")]
    if is_ignored(layer, ignore):
        return False
    return in_block or not re.search(r"embed|wte|wpe", layer)


def estimate(model_dir: str | Path, recipe: Any = None, n_samples: int | None = None,
             seq_len: int | None = None) -> Estimate:
    """Memory and disk of compressing `model_dir` with `recipe` (default Recipe), from headers only."""
    directory = Path(model_dir)
    return estimate_tensors(checkpoint_tensors(directory), _hidden_size(_text_config(directory), directory),
                            recipe, n_samples, seq_len)


def estimate_model(model: Any, recipe: Any = None, n_samples: int | None = None, seq_len: int | None = None,
                   quantized: set[str] | None = None) -> Estimate:
    """`estimate` of a loaded (or meta-device) model, from its tensors: for models without safetensors
    headers to read."""
    hidden = model.get_input_embeddings().weight.shape[1]
    return estimate_tensors(model_tensors(model), hidden, recipe, n_samples, seq_len, quantized)


def model_tensors(model: Any) -> dict[str, TensorInfo]:
    """The tensors of a loaded (or meta-device) model as a checkpoint would list them (tied tensors once,
    under their first name), for `estimate_tensors` when there are no safetensors headers to read."""
    from frugal.exporters.hf import tensor_identity

    out: dict[str, TensorInfo] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        ptr = tensor_identity(t)  # tied tensors are one view; MoE experts are views of one storage each
        if ptr in seen and t.numel():
            continue
        seen.add(ptr)
        dtype = DTYPE_CODES.get(str(t.dtype).removeprefix("torch."), "F32")
        out[name] = TensorInfo(dtype, tuple(t.shape), "", (0, 0))
    return out


def estimate_tensors(tensors: dict[str, TensorInfo], hidden: int, recipe: Any = None, n_samples: int | None = None,
                     seq_len: int | None = None, quantized: set[str] | None = None) -> Estimate:
    """`estimate` from a tensor listing (checkpoint_tensors or model_tensors) and the hidden size.
    `quantized`: the layer names to count as quantized, instead of the recipe's rule (_quantized)."""
    from frugal.compression import methods
    from frugal.compression.transforms import float_targets
    from frugal.config import Recipe
    from frugal.quant.sizes import packed_bytes, scale_bytes

    recipe = recipe or Recipe()
    method = methods.get(recipe.method)
    n = recipe.calibration.num_samples if n_samples is None else n_samples
    seq = recipe.calibration.seq_len if seq_len is None else seq_len
    prefix, n_blocks = block_list(list(tensors))
    blocks = [0] * n_blocks
    hess = [0] * n_blocks
    hess32 = [0] * n_blocks  # the float32 matrices the solve holds (the accumulators are freed by then)
    outside = output = 0
    layer_work = held = widest = 0
    stored = recipe.cast_dtype()  # bytes per value of what stays unquantized in the file
    store_bytes = FLOAT_BYTES if stored is None else stored.itemsize
    scale_store = scale_bytes(recipe.storage.scale_dtype, FLOAT_BYTES)  # "model" scales (float32 in frugal)

    def counted(name: str, t: TensorInfo, in_block: bool) -> bool:  # stored quantized?
        if quantized is None:
            return _quantized(name, t, in_block, recipe.ignore)
        return name.endswith(".weight") and name[: -len(".weight")] in quantized and len(t.shape) == 2

    for name, t in tensors.items():
        m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.", name)
        nbytes = t.numel * FLOAT_BYTES if t.is_float else t.numel * DTYPE_BYTES.get(t.dtype, 4)
        if m:
            blocks[int(m.group(1))] += nbytes
        else:
            outside += nbytes
        if not counted(name, t, m is not None):
            output += t.numel * store_bytes if t.is_float else nbytes
            continue
        s = recipe.scheme_for(name[: -len(".weight")])
        sb = scale_bytes(s.scale_dtype, scale_store)
        output += packed_bytes(*t.shape, s.bits, s.group_size, s.symmetric, sb)
        out_f, in_f = t.shape
        held += packed_bytes(out_f, in_f, s.bits, s.group_size, s.symmetric, sb, layout="memory")  # int8 codes
        if m:
            widest = max(widest, out_f, in_f)
        layer_work = max(layer_work, method.work_bytes(out_f, in_f))
        if m and method.needs_hessian:
            hess[int(m.group(1))] += method.hessian_bytes(in_f)
            hess32[int(m.group(1))] += in_f * in_f * FLOAT_BYTES
    # refinement also carries the float model's hidden states: twice the activations
    batch = min(n, recipe.calibration.batch_size)
    forward = forward_bytes(batch, seq, hidden, widest) if recipe.needs_calibration else 0
    return _combine(sum(blocks) + outside, max(blocks), outside, n_blocks, hidden, n * (2 if float_targets(recipe) else 1),
                    seq, recipe.needs_calibration, max(hess), output, layer_work, held, forward, max(hess32))


def forward_bytes(batch: int, seq: int, hidden: int, widest: int) -> int:
    """Temporaries of one block forward on `batch` sequences: three (batch, seq, widest) MLP tensors, four
    of the hidden size and two sets of attention scores (heads taken as hidden / 64)."""
    return (batch * seq * (3 * widest + 4 * hidden) + 2 * batch * max(hidden // 64, 1) * seq * seq) * FLOAT_BYTES


def _combine(model: int, block: int, outside: int, n_blocks: int, hidden: int, n: int, seq: int, calibrated: bool,
             hessian: int, output: int, layer_work: int, held: int = 0, forward: int = 0,
             hessian_solve: int = 0) -> Estimate:
    """Add the pieces up (see the module docstring). The statistics pass holds the accumulators
    (`hessian`), the solve only their float32 matrices (`hessian_solve`) beside one layer's work."""
    acts = n * seq * hidden * FLOAT_BYTES if calibrated else 0
    sample = acts // max(n, 1)
    solve = max(hessian, hessian_solve + layer_work)
    in_memory = BASE_BYTES + LOADER_BYTES + model + held + max(2 * acts + solve + forward, 5 * output // 4)
    blocks_phase = outside + 2 * block + solve
    final_phase = 2 * outside + layer_work
    stream = BASE_BYTES + max(blocks_phase, final_phase)
    return Estimate(model_bytes=model, block_bytes=block, outside_bytes=outside, n_blocks=n_blocks,
                    activation_bytes=acts, hessian_bytes=hessian, output_bytes=output,
                    in_memory_ram_bytes=in_memory, peak_ram_bytes=stream + 2 * acts,
                    offload_ram_bytes=stream + acts + sample, disk_bytes=output + 2 * acts)


# -- the machine ----------------------------------------------------------------------------------
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if not text or text == "max" else int(text)


def _inactive_file(stat: Path) -> int:
    """Reclaimable page cache charged to a cgroup (memory.stat), 0 when unknown."""
    try:
        fields = dict(line.split() for line in stat.read_text().splitlines() if line.count(" ") == 1)
    except OSError:
        return 0
    return int(fields.get("total_inactive_file", fields.get("inactive_file", 0)))


def cgroup_headroom(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the process's memory cgroup still allows (limit - usage + reclaimable cache); None if unlimited."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            names, base = ("memory.max", "memory.current"), root
        elif "memory" in controllers.split(","):  # cgroup v1
            names, base = ("memory.limit_in_bytes", "memory.usage_in_bytes"), root / "memory"
        else:
            continue
        for d in (base / path.lstrip("/"), base):  # inside a container the path may not be mounted
            limit, usage = _read_int(d / names[0]), _read_int(d / names[1])
            if usage is not None:
                if limit is None or limit >= 2**60:
                    break
                return max(0, limit - usage + _inactive_file(d / "memory.stat"))
    return None


def available_ram_bytes(meminfo: Path = Path("/proc/meminfo"), proc: Path = Path("/proc/self/cgroup"),
                        root: Path = Path("/sys/fs/cgroup")) -> int:
    """RAM this process can still use: MemAvailable, or less when a cgroup limit is closer."""
    avail = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    cg = cgroup_headroom(proc, root)
    return avail if cg is None else min(avail, cg)


def peak_rss_bytes() -> int:
    """This process's peak resident size (VmHWM). Not ru_maxrss: a child started by fork/vfork + exec
    reports at least its parent's resident size there (Linux keeps it across exec). ru_maxrss only
    where /proc is absent. The one peak-memory measurement of frugal (streaming, eval --speed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


# -- decisions ------------------------------------------------------------------------------------
MODES = {"memory": "in_memory_ram_bytes", "stream": "peak_ram_bytes", "stream-offload": "offload_ram_bytes"}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_fits(est: Estimate, available_ram: int, free_disk: int, mode: str = "stream") -> FrugalError | None:
    """None when the job fits this machine, else the error to raise (one line; --force overrides)."""
    need = getattr(est, MODES[mode])
    disk = est.output_bytes if mode == "memory" else est.disk_bytes
    what = {"memory": "in-memory compression", "stream": "streaming compression",
            "stream-offload": "streaming compression with activations on disk"}[mode]
    if need > available_ram:
        return FrugalError(f"pre-flight: {what} needs ~{_gb(need)} of RAM, this machine has {_gb(available_ram)} "
                           "available (MemAvailable / cgroup limit); pass --force to try anyway")
    if disk > free_disk:
        return FrugalError(f"pre-flight: {what} needs ~{_gb(disk)} of disk, the output's file system has "
                           f"{_gb(free_disk)} free; pass --force to try anyway")
    return None


def choose_mode(est: Estimate, available_ram: int, free_disk: int) -> str | None:
    """The first of in-memory, streaming, streaming with offloaded activations that fits; None if none."""
    return next((m for m in MODES if check_fits(est, available_ram, free_disk, m) is None), None)


def decide(model_dir: str | Path, recipe: Any, out: str | Path, stream: bool | None = None,
           force: bool = False) -> tuple[str, Estimate]:
    """The mode for `frugal compress` ("memory", "stream" or "stream-offload") and its estimate.

    `stream` None: the first mode that fits this machine (streaming when the model does not fit in
    memory). True/False: that path, with activations offloaded when only that fits. Raises the
    check's FrugalError when the chosen mode does not fit, unless `force`."""
    est = estimate(model_dir, recipe)
    ram, disk = available_ram_bytes(), free_disk_bytes(Path(out).absolute().parent)
    if stream is None:
        mode = choose_mode(est, ram, disk) or "stream-offload"
    elif stream:
        mode = "stream" if check_fits(est, ram, disk, "stream") is None else "stream-offload"
    else:
        mode = "memory"
    err = check_fits(est, ram, disk, mode)
    if err is not None and not force:
        raise err
    return mode, est
