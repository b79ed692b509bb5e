"""RTN as a walker method: no statistics, each Linear rounded on its own."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantcore.methods.base import ModuleDone, QuantScheme, install_quantized
from quantcore.methods.rtn import quantize_rtn
from quantcore.qtensor import QuantizedWeight


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
            qw = quantize_rtn(linear.weight.data, scheme.bits, scheme.group_size, scheme.symmetric)
            err = install_quantized(linear, qw)
            out[name] = qw
            on_module(name, qw, err)
        return out
