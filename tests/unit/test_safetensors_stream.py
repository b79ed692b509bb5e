"""The streaming safetensors writer: files the real safetensors library reads back exactly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantcore.formats.safetensors_stream import StreamingSafetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        # Odd byte counts in between: alignment must come from the order, not the sizes.
        "a.int8": torch.randint(-128, 127, (3, 5), generator=g, dtype=torch.int8),
        "b.bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "c.f32": torch.randn(4, 9, generator=g),
        "d.i64": torch.arange(5, dtype=torch.int64),
        "e.scalar": torch.tensor(2.5, dtype=torch.float16),
        "f.empty": torch.zeros(0, 4),
        "g.bool": torch.tensor([True, False, True]),
        "h.noncontig": torch.randn(6, 4, generator=g).t(),
        "i.i32": torch.randint(0, 2**31 - 1, (11,), generator=g, dtype=torch.int32),
    }


def test_round_trip_through_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    w = StreamingSafetensors(path, metadata={"format": "pt"})
    tensors = _tensors()
    for k, t in tensors.items():
        w.add(k, t)
    assert not path.exists()  # the file appears only once it is whole
    w.close()
    back = load_file(path)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k], t), k
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # spools gone


def test_every_tensor_is_aligned_and_the_buffer_has_no_holes(tmp_path):
    path = tmp_path / "x.safetensors"
    w = StreamingSafetensors(path)
    for k, t in _tensors().items():
        w.add(k, t)
    w.close()
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I8": 1, "BOOL": 1}
    for k, v in header.items():
        if k != "__metadata__":
            assert (8 + n + v["data_offsets"][0]) % sizes[v["dtype"]] == 0, k


def test_abort_leaves_nothing(tmp_path):
    w = StreamingSafetensors(tmp_path / "x.safetensors")
    w.add("a", torch.ones(3))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_unknown_dtype_is_refused_by_name(tmp_path):
    w = StreamingSafetensors(tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="c.weight: dtype torch.complex64"):
        w.add("c.weight", torch.ones(2, dtype=torch.complex64))
    w.abort()
