"""`PackedWeight`: the tensors every kernel in this package reads, independent of quantcore.

The layout is compressed-tensors `pack-quantized` with one deliberate difference: zero points are
kept unpacked (uint8 [N, G]) rather than packed along dim 0 as the artifact stores them. They
are N*G bytes (1/64 of the 4-bit codes at group 128), so unpacking them once at load costs
nothing measurable and keeps the kernels' inner loop free of a second bit-extraction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from qfkernels.packing import pack_factor, pack_int32, packed_width, unpack_int32

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class PackedWeight:
    """A quantized Linear weight [out_features N, in_features K] in packed form.

    qweight: int32 [N, ceil(K / (32 // bits))], codes packed along K, lowest bits first.
    scales:  fp16/bf16/fp32 [N, G].
    zeros:   uint8 [N, G] unsigned zero points, or None for symmetric (2**(bits-1) everywhere).
    g_idx:   int32 [K], group of each input column (act-order), or None for column // group_size.
    group_size: columns per group (in_features for per-channel); the last group may be partial.

    Dequantized: w[n, k] = (code[n, k] - zero[n, g(k)]) * scale[n, g(k)].
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self) -> None:
        n, k = self.out_features, self.in_features
        if self.qweight.dtype != torch.int32 or self.qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int32 tensor, got {self.qweight.dtype}")
        if self.qweight.shape[1] != packed_width(k, self.bits):
            raise ValueError(
                f"qweight width {self.qweight.shape[1]} does not hold {k} {self.bits}-bit codes"
            )
        if self.scales.dtype not in SCALE_DTYPES:
            raise ValueError(f"scales dtype {self.scales.dtype} not in {SCALE_DTYPES}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        g = self.scales.shape[1] if self.scales.dim() == 2 else -1
        if self.scales.shape[0] != n or g < 1:
            raise ValueError(f"scales shape {tuple(self.scales.shape)} does not match N={n}")
        if self.g_idx is None and g != (k + self.group_size - 1) // self.group_size:
            raise ValueError(
                f"{g} scale groups do not match in_features={k} with group_size={self.group_size}"
            )
        if self.zeros is not None and (
            self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != (n, g)
        ):
            raise ValueError(
                f"zeros must be uint8 [{n}, {g}], got {self.zeros.dtype} {tuple(self.zeros.shape)}"
            )
        if self.g_idx is not None and tuple(self.g_idx.shape) != (k,):
            raise ValueError(f"g_idx must have shape [{k}], got {tuple(self.g_idx.shape)}")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def pack_factor(self) -> int:
        return pack_factor(self.bits)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device: str | torch.device) -> PackedWeight:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            qweight=self.qweight.to(device),
            scales=self.scales.to(device),
            zeros=move(self.zeros),
            g_idx=move(self.g_idx),
        )

    def nbytes(self) -> int:
        """Bytes a kernel reads for the weight (codes, scales, zero points, g_idx)."""
        ts = [self.qweight, self.scales, self.zeros, self.g_idx]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bits: int,
        group_size: int,
        g_idx: torch.Tensor | None = None,
    ) -> PackedWeight:
        """Pack unsigned codes [N, K]; `zeros=None` (or `group_size=-1`) as in the class doc."""
        k = codes.shape[1]
        return cls(
            qweight=pack_int32(codes, bits),
            scales=scales.contiguous(),
            zeros=None if zeros is None else zeros.to(torch.uint8).contiguous(),
            g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous(),
            bits=bits,
            group_size=k if group_size == -1 else group_size,
            in_features=k,
        )

    def artifact_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The pack-quantized tensors of Linear `name`, as an artifact stores them (the inverse
        of `from_artifact`): zero points packed along the output dim."""
        out = {
            f"{name}.weight_packed": self.qweight.contiguous(),
            f"{name}.weight_scale": self.scales.contiguous(),
            f"{name}.weight_shape": torch.tensor(
                [self.out_features, self.in_features], dtype=torch.int32
            ),
        }
        if self.zeros is not None:
            out[f"{name}.weight_zero_point"] = (
                pack_int32(self.zeros.t(), self.bits).t().contiguous()
            )
        if self.g_idx is not None:
            out[f"{name}.weight_g_idx"] = self.g_idx
        return out

    @classmethod
    def from_artifact(
        cls,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        bits: int,
        group_size: int | None,
        symmetric: bool,
    ) -> PackedWeight:
        """From the pack-quantized tensors of Linear `name` (`{name}.weight_packed`, ...).

        `group_size` None or -1 means per-channel, as in compressed-tensors' config.
        """
        n, k = (int(x) for x in tensors[f"{name}.weight_shape"])
        scales = tensors[f"{name}.weight_scale"]
        if symmetric:
            zeros = None
        else:
            # The artifact packs zero points along the output dim: unpack once here.
            zp = tensors[f"{name}.weight_zero_point"]
            zeros = unpack_int32(zp.t().contiguous(), bits, n).t().contiguous()
        g_idx = tensors.get(f"{name}.weight_g_idx")
        return cls(
            qweight=tensors[f"{name}.weight_packed"].contiguous(),
            scales=scales.contiguous(),
            zeros=zeros,
            g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous(),
            bits=bits,
            group_size=k if group_size in (None, -1) else int(group_size),
            in_features=k,
        )


def packed_weights_from_artifact(
    tensors: Mapping[str, torch.Tensor], bits: int, group_size: int | None, symmetric: bool
) -> dict[str, PackedWeight]:
    """Every quantized Linear of an artifact's flat tensor dict, keyed by module name."""
    suffix = ".weight_packed"
    names = [key[: -len(suffix)] for key in tensors if key.endswith(suffix)]
    return {n: PackedWeight.from_artifact(n, tensors, bits, group_size, symmetric) for n in names}
