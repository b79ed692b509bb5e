"""Per-layer checkpoints: a killed run, started again with the same request, resumes after the
last finished layer and produces bit-identical results.

After each layer the directory holds that layer's quantized weights and float state (methods
such as AWQ also change norms), and the inputs of the next layer. `meta.json` is written last,
atomically, so a crash mid-write leaves the previous layer as the resume point.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantcore.qtensor import QuantizedWeight

_QW_FIELDS = ("codes", "scales", "zeros", "g_idx")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        tmp,
        metadata={"json": json.dumps(metadata or {})},
    )
    os.replace(tmp, path)


class LayerCheckpoint:
    """The checkpoint directory of one run, identified by `key` (a digest of the request).
    A directory left by a different request is discarded."""

    def __init__(self, root: Path, key: str):
        self.root = Path(root)
        self.key = key
        meta = self._read_meta()
        if meta is not None and meta.get("key") != key:
            shutil.rmtree(self.root)
            meta = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._meta = meta or {"key": key, "layers_done": 0, "values": {}}

    def _read_meta(self) -> dict | None:
        p = self.root / "meta.json"
        return json.loads(p.read_text()) if p.exists() else None

    def _write_meta(self) -> None:
        tmp = self.root / "meta.json.tmp"
        tmp.write_text(json.dumps(self._meta))
        os.replace(tmp, self.root / "meta.json")

    @property
    def layers_done(self) -> int:
        return int(self._meta["layers_done"])

    def value(self, name: str):
        """A small result of an earlier phase (e.g. the base model's perplexity), or None."""
        return self._meta["values"].get(name)

    def set_value(self, name: str, value) -> None:
        self._meta["values"][name] = value
        self._write_meta()

    def save_layer(
        self,
        index: int,
        block_state: dict[str, torch.Tensor],
        quantized: dict[str, QuantizedWeight],
        next_inputs: list[torch.Tensor],
    ) -> None:
        if index != self.layers_done:
            raise ValueError(f"checkpoint expects layer {self.layers_done}, got {index}")
        tensors = {f"state.{k}": v.detach().cpu() for k, v in block_state.items()}
        info = {}
        for name, qw in quantized.items():
            info[name] = {"bits": qw.bits, "group_size": qw.group_size, "symmetric": qw.symmetric}
            for f in _QW_FIELDS:
                t = getattr(qw, f)
                if t is not None:
                    tensors[f"q.{name}.{f}"] = t.cpu()
        _atomic_save(tensors, self.root / f"layer-{index:05d}.safetensors", info)
        _atomic_save(
            {str(i): h.cpu() for i, h in enumerate(next_inputs)}, self.root / "inputs.safetensors"
        )
        self._meta["layers_done"] = index + 1
        self._write_meta()

    def load_layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
        path = self.root / f"layer-{index:05d}.safetensors"
        tensors = load_file(path)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        info = json.loads(header["__metadata__"]["json"])
        state = {k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")}
        quantized = {
            name: QuantizedWeight(
                codes=tensors[f"q.{name}.codes"],
                scales=tensors[f"q.{name}.scales"],
                zeros=tensors[f"q.{name}.zeros"],
                g_idx=tensors.get(f"q.{name}.g_idx"),
                **meta,
            )
            for name, meta in info.items()
        }
        return state, quantized

    def load_inputs(self) -> list[torch.Tensor]:
        t = load_file(self.root / "inputs.safetensors")
        return [t[str(i)] for i in range(len(t))]

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
