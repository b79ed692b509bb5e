"""A safetensors file written one tensor at a time, holding no tensor after it is written.

`safetensors.torch.save_file` needs every tensor of a file in memory at once: for a 2 GiB
shard that is 2 GiB of host memory, more than one decoder layer of most models. Here each
tensor's bytes go to a spool file as soon as it is added; `close()` writes the header and
appends the spools, so memory holds one tensor and the header.

One spool per element size, appended largest first (as safetensors' own writer orders
tensors), so every tensor starts at an offset aligned to its element size. The result is the
format exactly: an 8-byte little-endian header length, the JSON header padded with spaces to
a multiple of 8, then the data buffer with no holes.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class StreamingSafetensors:
    """Add tensors, then `close()`; the file at `path` exists only after `close()`."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata or {}
        self._spools: dict[int, object] = {}
        self._entries: dict[int, list[tuple[str, str, list[int], int]]] = {}
        self.nbytes = 0

    def _spool(self, size: int):
        if size not in self._spools:
            spool = self.path.with_name(f"{self.path.name}.spool{size}")
            self._spools[size] = open(spool, "w+b")  # noqa: SIM115 - closed in close()
            self._entries[size] = []
        return self._spools[size]

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        t = t.detach().to("cpu").contiguous()
        size = t.element_size()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._spool(size).write(memoryview(raw))
        n = t.numel() * size
        self._entries[size].append((name, DTYPES[t.dtype], list(t.shape), n))
        self.nbytes += n

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())

    def names(self) -> list[str]:
        return [e[0] for size in sorted(self._entries, reverse=True) for e in self._entries[size]]

    def close(self) -> None:
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        offset = 0
        order = sorted(self._spools, reverse=True)
        for size in order:
            for name, dtype, shape, n in self._entries[size]:
                header[name] = {
                    "dtype": dtype,
                    "shape": shape,
                    "data_offsets": [offset, offset + n],
                }
                offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for size in order:
                spool = self._spools[size]
                spool.seek(0)
                shutil.copyfileobj(spool, out, 1 << 20)
        self._discard()

    def _discard(self) -> None:
        for size, spool in self._spools.items():
            spool.close()
            self.path.with_name(f"{self.path.name}.spool{size}").unlink(missing_ok=True)
        self._spools.clear()

    def abort(self) -> None:
        self._discard()
        self.path.unlink(missing_ok=True)
