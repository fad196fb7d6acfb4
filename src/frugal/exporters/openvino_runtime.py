"""Run an exported OpenVINO IR with the OpenVINO CPU plugin: full-sequence logits and greedy decoding
with the model's stateful KV cache. The interface of frugal.exporters.onnx_runtime.OrtCausalLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

# The CPU plugin's defaults trade accuracy for speed: activations of compressed-weight FullyConnected
# layers are quantized to int8 in groups of 32 and the KV cache is stored as u8 (2026.4). These keep
# float32 throughout, so the logits are those of frugal's model up to float32 rounding.
EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0", "KV_CACHE_PRECISION": "f32"}


class OvCausalLM:
    """A `frugal --format openvino` directory compiled for the OpenVINO CPU plugin.

    `exact=False` keeps the plugin's own defaults (dynamic int8 activations, u8 KV cache)."""

    def __init__(self, directory: str | Path, threads: int = 1, exact: bool = True, **config: Any):
        import openvino as ov

        from frugal.exporters.openvino import XML_FILE

        core = ov.Core()
        options = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                   **(EXACT if exact else {}), **config}
        self.compiled = core.compile_model(core.read_model(Path(directory) / XML_FILE), "CPU", options)
        self.request = self.compiled.create_infer_request()
        self.done = 0  # tokens in the cache

    def reset(self) -> None:
        """Empty the KV cache (the next step starts a new sequence)."""
        self.request.reset_state()
        self.done = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Run new tokens `ids` (B, S) after the cached ones: logits (B, S, V); the cache grows by S."""
        batch, seq = ids.shape
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((batch, self.done + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(self.done, self.done + seq, dtype=np.int64),
                                                 (batch, seq)).copy(),
                 "beam_idx": np.arange(batch, dtype=np.int32)}
        self.request.infer(feeds)
        self.done += seq
        return self.request.get_tensor("logits").data.copy()

    def logits(self, input_ids: Any) -> torch.Tensor:
        """Logits (B, S, V) of a whole sequence with an empty cache."""
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        self.reset()
        return torch.from_numpy(self.step(ids))

    def generate_greedy(self, input_ids: Any, n: int) -> torch.Tensor:
        """`input_ids` (B, S) followed by `n` greedily chosen tokens, one step per token with the cache."""
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        self.reset()
        logits = self.step(ids)
        new = []
        for _ in range(n):
            token = logits[:, -1].argmax(-1)[:, None]  # (B, 1)
            new.append(token)
            if len(new) < n:
                logits = self.step(token)
        return torch.from_numpy(np.concatenate([ids, *new], axis=1))
