"""QuantLinear: an nn.Linear replacement that computes straight from packed weights.

On CUDA it runs the Triton kernels (GEMV for decode-sized batches, GEMM above); on the CPU it
runs the torch reference. Triton is imported only when a Triton path runs, so this module (and
`import qfkernels`) works where triton is not installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from qfkernels.packed_weight import PackedWeight
from qfkernels.reference import dequantize, reference_linear

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")
# Up to this many rows the split-K GEMV wins (weight-bandwidth bound); above, the tiled GEMM.
GEMV_MAX_M = 16


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: Backend, x: torch.Tensor) -> Literal["triton", "reference"]:
    """ "auto" is Triton for CUDA tensors when triton is installed, else the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_available() else "reference"
    return backend


def quant_matmul(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., K]; the output has x's dtype and leading shape."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if resolve_backend(backend, x) == "reference":
        y = reference_linear(x2, w, bias)
    elif x2.shape[0] <= GEMV_MAX_M:
        from qfkernels.triton_gemv import gemv

        y = gemv(x2, w, bias)
    else:
        from qfkernels.triton_gemm import gemm

        y = gemm(x2, w, bias)
    return y.reshape(*lead, w.out_features)


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W held packed (codes int32, scales, zero points, g_idx) as buffers.

    Build it from a PackedWeight: `PackedWeight.from_artifact` reads an artifact's packed
    tensors as they are (`QuantLinear.from_artifact` does both steps), `PackedWeight.from_codes`
    packs unpacked codes (what quantcore's `unpack_quantized_tensors` returns).
    Buffers move with `.to(device)`; `.half()` etc. cast the scales and bias, never the codes.
    """

    def __init__(
        self, weight: PackedWeight, bias: torch.Tensor | None = None, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.backend: Backend = backend
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.register_buffer("g_idx", weight.g_idx)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._dense: torch.Tensor | None = None
        self._dense_key: tuple | None = None

    @classmethod
    def from_artifact(
        cls,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        bits: int,
        group_size: int | None,
        symmetric: bool,
        bias: torch.Tensor | None = None,
        backend: Backend = "auto",
    ) -> QuantLinear:
        """From an artifact's flat tensors (`{name}.weight_packed`, `.weight_scale`, ...)."""
        if bias is None:
            bias = tensors.get(f"{name}.bias")
        w = PackedWeight.from_artifact(name, tensors, bits, group_size, symmetric)
        return cls(w, bias, backend)

    def packed(self) -> PackedWeight:
        """The current buffers (after any .to()) as a PackedWeight."""
        return PackedWeight(
            qweight=self.qweight,
            scales=self.scales,
            zeros=self.zeros,
            g_idx=self.g_idx,
            bits=self.bits,
            group_size=self.group_size,
            in_features=self.in_features,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.packed()
        if resolve_backend(self.backend, x) == "triton":
            return quant_matmul(x, w, self.bias, "triton")
        # The reference path dequantizes the packed bytes once per dtype and device and keeps
        # the dense weight (CPU evaluation would otherwise unpack every layer every forward).
        key = (x.dtype, x.device, self.qweight.data_ptr(), self.scales.data_ptr())
        if self._dense_key != key:
            self._dense = dequantize(w, x.dtype).float()
            self._dense_key = key
        y = reference_linear(x.reshape(-1, x.shape[-1]), w, self.bias, dense=self._dense)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, "
            f"symmetric={self.zeros is None}, act_order={self.g_idx is not None}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )


def replace_linears(
    model: nn.Module, weights: Mapping[str, PackedWeight], backend: Backend = "auto"
) -> list[str]:
    """Swap each `nn.Linear` named in `weights` for a QuantLinear over its packed weight.

    The bias is taken from the replaced Linear, the device from its weight. Returns the names
    replaced; a name that is not an nn.Linear of matching shape raises (a silent skip would
    leave a dense layer in a model reported as quantized).
    """
    for name, w in weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name} is not an nn.Linear in the model (found {type(old)})")
        if (old.out_features, old.in_features) != (w.out_features, w.in_features):
            raise ValueError(
                f"{name}: packed weight is [{w.out_features}, {w.in_features}], the Linear "
                f"[{old.out_features}, {old.in_features}]"
            )
        bias = None if old.bias is None else old.bias.detach()
        setattr(parent, child, QuantLinear(w.to(old.weight.device), bias, backend))
    return list(weights)
