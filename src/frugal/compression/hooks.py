"""Hooks and calls on decoder blocks, shared by the engines, the analysis and the evaluation.

`capture_block_inputs` records what every block receives (hidden states, positional and keyword
arguments) without tracing; `InputHooks` accumulates statistics of the inputs of a block's linear
layers (GPTQ Hessians, AWQ activation statistics), sharing one accumulator between layers fed the very
same tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from frugal.quant.gptq import Hessian


class Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class BlockInputs:
    """Inputs of the current block: hidden states per sample and the call's other arguments."""

    hidden: list[torch.Tensor]  # each (1, seq, hidden)
    args: tuple  # positional arguments after the hidden states
    kwargs_per_block: list[dict[str, Any]] = field(default_factory=list)


def detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(detach(o) for o in obj)
    if isinstance(obj, list):
        return [detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: detach(v) for k, v in obj.items()}
    return obj


def split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """Separate the hidden states from a block call's other arguments."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


@contextlib.contextmanager
def recording_calls(blocks: nn.ModuleList) -> Iterator[list]:
    """While open, each call of block i stores (hidden states, positional args after them, keyword
    args), detached, in the yielded list's slot i (None until the block is called). The one way frugal
    records block calls: the engines, the streaming skeleton and the per-block evaluation use it."""
    calls: list = [None] * len(blocks)

    def probe(i: int):
        def hook(_mod, args, kwargs):
            hidden, rest, kw = split_hidden(args, kwargs)
            calls[i] = (hidden.detach(), detach(rest), detach(kw))
        return hook

    handles = [b.register_forward_pre_hook(probe(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor) -> BlockInputs:
    """Run the model on (n, seq) token ids far enough to record every block's call arguments."""
    with recording_calls(blocks) as calls:
        model(samples[:1], use_cache=False)  # one full pass records every block's call
    first_hidden, first_args, _ = calls[0]
    hidden = [first_hidden.clone()]

    def stop_at_first(_mod, args, kwargs):
        hidden.append(split_hidden(args, kwargs)[0].detach().clone())
        raise Stop

    handle = blocks[0].register_forward_pre_hook(stop_at_first, with_kwargs=True)
    try:
        for i in range(1, samples.shape[0]):
            try:
                model(samples[i : i + 1], use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden=hidden, args=first_args, kwargs_per_block=[c[2] if c else {} for c in calls])


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def batches(hidden: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive (1, seq, hidden) samples concatenated `batch_size` at a time, (B, seq, hidden); a sample
    whose shape differs from the batch's starts a new one. Lazy: `hidden` may be read from disk."""
    chunk: list[torch.Tensor] = []
    for x in hidden:
        if chunk and (len(chunk) == batch_size or x.shape != chunk[0].shape):
            yield torch.cat(chunk) if len(chunk) > 1 else chunk[0]
            chunk = []
        chunk.append(x)
    if chunk:
        yield torch.cat(chunk) if len(chunk) > 1 else chunk[0]


def run_batched(block: nn.Module, hidden: Iterable[torch.Tensor], args: tuple, kwargs: dict, batch_size: int,
                after_batch: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """The block's output for each (1, seq, hidden) sample, computed `batch_size` samples per call (the
    arguments captured at batch 1 broadcast over the batch; on CPU the rows equal batch-1 results bit for
    bit, tests/compression/test_batching.py). `after_batch` runs after each call (hooks' end_sample)."""
    outs: list[torch.Tensor] = []
    for x in batches(hidden, batch_size):
        outs.extend(run_block(block, x, args, kwargs).split(1))
        if after_batch is not None:
            after_batch()
    return outs


def feed_batched(block: nn.Module, hidden: Iterable[torch.Tensor], args: tuple, kwargs: dict, batch_size: int,
                 hooks: "InputHooks") -> None:
    """Run the block over the samples only for what `hooks` collect: `batch_size` samples per call, the first
    call whole, each later one stopped once every hooked layer was fed (InputHooks.settle). The statistics
    are those of complete calls: nothing after the last hooked layer feeds them."""
    for k, x in enumerate(batches(hidden, batch_size)):
        try:
            run_block(block, x, args, kwargs)
        except Stop:
            pass
        if k == 0:
            hooks.settle()
        hooks.end_sample()


class InputHooks:
    """Accumulate something about each linear layer's inputs (`new(x)` makes an accumulator, `add(acc, x)`
    feeds it one sample, (1, ..., in): a batched call (B, seq, in) is fed sample by sample, so sums are
    those of batch 1); layers fed the very same tensor (q/k/v, gate/up) share one accumulator."""

    def __init__(self, layers: dict[str, nn.Linear], new: Callable, add: Callable):
        self.layers, self._new, self._add = layers, new, add
        self.acc: dict[str, Any] = {}
        self._owner: dict[str, str] = {}  # layer -> layer whose accumulator it shares
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._handles = []
        self._fed: set[str] = set()  # layers fed in the current call
        self._calls = 0  # hook calls in the current call
        self.stop_early = False  # set by `settle`: end each later call once every layer was fed

    def _hook(self, name: str):
        def hook(_mod, args):
            self._calls += 1
            self._feed(name, args[0])
            self._fed.add(name)
            if self.stop_early and len(self._fed) == len(self.layers):
                raise Stop  # what follows the last hooked layer adds nothing to the statistics
        return hook

    def _feed(self, name: str, x: torch.Tensor) -> None:
        if name not in self._owner:  # first call decides sharing
            seen = self._seen.get(id(x))
            if seen is not None and seen[1] is x:
                self._owner[name] = seen[0]
                self.acc[name] = self.acc[seen[0]]
                return
            self._owner[name] = name
            self._seen[id(x)] = (name, x)
            self.acc[name] = self._new(x)
        if self._owner[name] == name:
            for sample in (x.split(1) if x.dim() >= 3 else (x,)):
                self._add(self.acc[name], sample)

    def __enter__(self) -> "InputHooks":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def end_sample(self) -> None:
        self._seen.clear()
        self._fed.clear()
        self._calls = 0

    def settle(self) -> None:
        """After a first complete call: if it fed every layer exactly once, later calls may stop at the last
        hooked layer (a layer called twice, or one not called, keeps every call whole)."""
        self.stop_early = self._calls == len(self.layers) == len(self._fed)

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()


class HessianHooks(InputHooks):
    """Accumulate the Hessian of each linear layer's inputs (shared by layers fed the same tensor)."""

    def __init__(self, layers: dict[str, nn.Linear]):
        super().__init__(layers, lambda x: Hessian(x.shape[-1], device=x.device), lambda h, x: h.add(x))

    @property
    def hessians(self) -> dict[str, Hessian]:
        return self.acc
