"""RTN as a walker method: no statistics, each Linear rounded on its own."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantcore.methods.base import ModuleDone, QuantScheme
from quantcore.methods.rtn import quantize_rtn
from quantcore.qtensor import QuantizedWeight


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref = ref.float()
    denom = ref.pow(2).sum().clamp_min(1e-30)
    return float((ref - approx.float()).pow(2).sum() / denom)


class RTN:
    name = "rtn"
    needs_calibration = False

    @torch.no_grad()
    def quantize_block(
        self,
        block: nn.Module,
        modules: dict[str, tuple[nn.Linear, QuantScheme]],
        forward: Callable[[], None],
        on_module: ModuleDone,
    ) -> dict[str, QuantizedWeight]:
        out = {}
        for name, (linear, scheme) in modules.items():
            w = linear.weight.data
            qw = quantize_rtn(w, scheme.bits, scheme.group_size, scheme.symmetric)
            deq = qw.dequantize(w.dtype)
            err = relative_error(w, deq)
            linear.weight.data.copy_(deq)
            out[name] = qw
            on_module(name, qw, err)
        return out
