"""GPTQ as a walker method: collect each Linear's input Hessian with hooks, then quantize.

True-sequential: Linears that read the same input (q/k/v; gate/up) form one step; each step's
Hessians are collected with the earlier steps already quantized, so later Linears see the
inputs the quantized model will really give them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantcore.methods.base import ModuleDone, QuantScheme, install_quantized
from quantcore.methods.gptq import GPTQConfig, accumulate_hessian, gptq_quantize
from quantcore.qtensor import QuantizedWeight


class _Stats:
    """Running Hessians for a set of Linears, and which of them read the same input tensor."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.h = {
            n: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
            for n, m in modules.items()
        }
        self.n = dict.fromkeys(modules, 0)
        # The first input each module saw, kept alive so that tensor identity is meaningful
        # (the id of a freed tensor can be reused by a later one).
        self.first_input: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(_mod, args, _out):
            x = args[0].detach()
            self.first_input.setdefault(name, args[0])
            self.h[name], self.n[name] = accumulate_hessian(self.h[name], self.n[name], x)

        return hook

    def same_input(self, a: str, b: str) -> bool:
        x, y = self.first_input.get(a), self.first_input.get(b)
        return x is not None and x is y

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class GPTQ:
    name = "gptq"
    needs_calibration = True

    def __init__(
        self,
        block_size: int = 128,
        damp: float = 0.01,
        act_order: bool = True,
        mse: bool = False,
        true_sequential: bool = True,
    ):
        self.block_size = block_size
        self.damp = damp
        self.act_order = act_order
        self.mse = mse
        self.true_sequential = true_sequential

    def config(self, scheme: QuantScheme) -> GPTQConfig:
        return GPTQConfig(
            scheme.bits,
            scheme.group_size,
            scheme.symmetric,
            self.block_size,
            self.damp,
            self.act_order,
            self.mse,
        )

    @torch.no_grad()
    def quantize_block(
        self,
        block: nn.Module,
        modules: dict[str, tuple[nn.Linear, QuantScheme]],
        forward: Callable[[], None],
        on_module: ModuleDone,
    ) -> dict[str, QuantizedWeight]:
        remaining = dict(modules)
        out: dict[str, QuantizedWeight] = {}
        while remaining:
            stats = _Stats({n: lin for n, (lin, _) in remaining.items()})
            try:
                forward()
            finally:
                stats.remove()
            if self.true_sequential:
                first = next(iter(remaining))
                step = [n for n in remaining if stats.same_input(n, first)] or [first]
            else:
                step = list(remaining)
            for name in step:
                lin, scheme = remaining.pop(name)
                if stats.n[name] == 0:
                    raise RuntimeError(f"{name} saw no calibration input; it is never called")
                qw, _loss = gptq_quantize(lin.weight.data, stats.h[name], self.config(scheme))
                err = install_quantized(lin, qw)
                out[name] = qw
                on_module(name, qw, err)
            del stats
        return out
