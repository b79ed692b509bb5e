"""The one internal representation every method produces and every format is written from."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized Linear weight of shape [out_features, in_features].

    codes:  uint8 [out, in], unsigned codes in [0, 2**bits).
    scales: [out, n_groups], in the model's dtype.
    zeros:  uint8 [out, n_groups], unsigned zero points (2**(bits-1) when symmetric).
    g_idx:  int32 [in], group of each input column; None means column // group_size.
    group_size: columns per group; equal to in_features for per-channel. The last group may be
        partial when group_size does not divide in_features.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def to(self, device: str | torch.device) -> QuantizedWeight:
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        return replace(
            self,
            codes=self.codes.to(device),
            scales=self.scales.to(device),
            zeros=self.zeros.to(device),
            g_idx=g_idx,
        )

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out_f, in_f = self.codes.shape
        if self.g_idx is None and in_f % self.group_size == 0:
            # Contiguous groups: broadcast each group's scale instead of gathering per column.
            n = in_f // self.group_size
            w = self.codes.reshape(out_f, n, self.group_size).float()
            w.sub_(self.zeros.float()[..., None]).mul_(self.scales.float()[..., None])
            return w.view(out_f, in_f).to(dtype or self.scales.dtype)
        g = self.group_index()
        w = (self.codes.float() - self.zeros.float()[:, g]) * self.scales.float()[:, g]
        return w.to(dtype or self.scales.dtype)
