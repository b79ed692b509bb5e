"""Per-layer checkpoints: a killed run, started again with the same request, resumes after the
last finished layer and produces bit-identical results.

After each layer the directory holds that layer's quantized weights, the float tensors the
method changed without quantizing them (AWQ-folded norms), and the inputs of the next layer.
`meta.json` is written last, atomically, so a crash mid-write leaves the previous layer as the
resume point. The layer files double as the run's store of quantized weights: `quantized()`
reads them back one module at a time, so a finished walk holds none of them in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantcore.qtensor import QuantizedWeight

FORMAT = 2  # layer files hold quantized weights + changed floats (1: whole block state)
_QW_FIELDS = ("codes", "scales", "zeros", "g_idx")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        tmp,
        metadata={"json": json.dumps(metadata or {})},
    )
    os.replace(tmp, path)


def _metadata(path: Path) -> dict:
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["json"])


def _read_quantized(f, name: str, meta: dict) -> QuantizedWeight:
    keys = set(f.keys())
    return QuantizedWeight(
        codes=f.get_tensor(f"q.{name}.codes"),
        scales=f.get_tensor(f"q.{name}.scales"),
        zeros=f.get_tensor(f"q.{name}.zeros"),
        g_idx=f.get_tensor(f"q.{name}.g_idx") if f"q.{name}.g_idx" in keys else None,
        **meta,
    )


class StoredQuantized(Mapping[str, QuantizedWeight]):
    """The quantized weights of finished layers, read from their files on each access."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, tuple[Path, dict]] = {}
        for path in files:
            for name, meta in _metadata(path).items():
                self._where[name] = (path, meta)

    def __getitem__(self, name: str) -> QuantizedWeight:
        path, meta = self._where[name]
        with safe_open(path, framework="pt") as f:
            return _read_quantized(f, name, meta)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class LayerCheckpoint:
    """The checkpoint directory of one run, identified by `key` (a digest of the request).
    A directory left by a different request, or in an older layout, is discarded."""

    def __init__(self, root: Path, key: str):
        self.root = Path(root)
        self.key = key
        meta = self._read_meta()
        if meta is not None and (meta.get("key") != key or meta.get("format") != FORMAT):
            shutil.rmtree(self.root)
            meta = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._meta = meta or {"key": key, "format": FORMAT, "layers_done": 0, "values": {}}

    def _read_meta(self) -> dict | None:
        p = self.root / "meta.json"
        return json.loads(p.read_text()) if p.exists() else None

    def _write_meta(self) -> None:
        tmp = self.root / "meta.json.tmp"
        tmp.write_text(json.dumps(self._meta))
        os.replace(tmp, self.root / "meta.json")

    def _layer_file(self, index: int) -> Path:
        return self.root / f"layer-{index:05d}.safetensors"

    @property
    def layers_done(self) -> int:
        return int(self._meta["layers_done"])

    def value(self, name: str):
        """A small result of an earlier phase, or None."""
        return self._meta["values"].get(name)

    def set_value(self, name: str, value) -> None:
        self._meta["values"][name] = value
        self._write_meta()

    def save_layer(
        self,
        index: int,
        quantized: Mapping[str, QuantizedWeight],
        changed: Mapping[str, torch.Tensor],
        next_inputs: list[torch.Tensor],
    ) -> None:
        """Layer `index`'s quantized weights and changed floats (by full name), and the
        inputs of the next layer."""
        if index != self.layers_done:
            raise ValueError(f"checkpoint expects layer {self.layers_done}, got {index}")
        tensors = {f"r.{k}": v.detach().cpu() for k, v in changed.items()}
        info = {}
        for name, qw in quantized.items():
            info[name] = {"bits": qw.bits, "group_size": qw.group_size, "symmetric": qw.symmetric}
            for f in _QW_FIELDS:
                t = getattr(qw, f)
                if t is not None:
                    tensors[f"q.{name}.{f}"] = t.cpu()
        _atomic_save(tensors, self._layer_file(index), info)
        _atomic_save(
            {str(i): h.cpu() for i, h in enumerate(next_inputs)}, self.root / "inputs.safetensors"
        )
        self._meta["layers_done"] = index + 1
        self._write_meta()

    def load_layer(self, index: int) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
        """(quantized weights, changed floats) of a finished layer, by full name."""
        path = self._layer_file(index)
        info = _metadata(path)
        with safe_open(path, framework="pt") as f:
            quantized = {name: _read_quantized(f, name, meta) for name, meta in info.items()}
            changed = {k[2:]: f.get_tensor(k) for k in f.keys() if k.startswith("r.")}  # noqa: SIM118
        return quantized, changed

    def load_inputs(self) -> list[torch.Tensor]:
        t = load_file(self.root / "inputs.safetensors")
        return [t[str(i)] for i in range(len(t))]

    def quantized(self) -> StoredQuantized:
        """Every finished layer's quantized weights, read from disk on access."""
        return StoredQuantized([self._layer_file(i) for i in range(self.layers_done)])

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
