"""Run an exported ONNX model with ONNX Runtime (CPU): full-sequence logits and greedy decoding
with the KV cache. Shapes and names come from the graph, so no config is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


class OrtCausalLM:
    """A `frugal --format onnx` directory loaded in an ONNX Runtime CPU session."""

    def __init__(self, directory: str | Path, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(Path(directory) / "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self.past = {i.name: i.shape for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length KV cache: (batch, n_kv_heads, 0, head_dim) per layer and part."""
        return {name: np.zeros((batch, shape[1], 0, shape[3]), np.float32) for name, shape in self.past.items()}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run new tokens `ids` (B, S) after `past`: logits (B, S, V) and the grown cache."""
        batch, seq = ids.shape
        done = next(iter(past.values())).shape[2]
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((batch, done + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(done, done + seq, dtype=np.int64), (batch, seq)).copy(),
                 **past}
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outputs) if n != "logits"}
        return outputs[names.index("logits")], present

    def logits(self, input_ids: Any) -> torch.Tensor:
        """Logits (B, S, V) of a whole sequence with an empty cache."""
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        out, _ = self.step(ids, self.empty_past(ids.shape[0]))
        return torch.from_numpy(out)

    def generate_greedy(self, input_ids: Any, n: int) -> torch.Tensor:
        """`input_ids` (1, S) followed by `n` greedily chosen tokens, one step per token with the cache."""
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        logits, past = self.step(ids, self.empty_past(ids.shape[0]))
        new = []
        for _ in range(n):
            token = logits[:, -1].argmax(-1)[:, None]  # (B, 1)
            new.append(token)
            if len(new) < n:
                logits, past = self.step(token, past)
        return torch.from_numpy(np.concatenate([ids, *new], axis=1))
