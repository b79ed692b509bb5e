"""What the walker asks of a method, and the per-module quantization scheme."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from quantcore.qtensor import QuantizedWeight


@dataclass(frozen=True)
class QuantScheme:
    bits: int
    group_size: int  # -1: per output channel
    symmetric: bool


@dataclass(frozen=True)
class SchemeMap:
    """Which scheme a module gets: the default, or the first override whose regex matches
    (an override with scheme None leaves the module in floating point).

    Modules matching an `ignore` pattern stay in floating point.
    """

    default: QuantScheme
    overrides: tuple[tuple[str, QuantScheme | None], ...] = ()
    ignore: tuple[str, ...] = field(default=("lm_head",))

    def scheme_for(self, name: str) -> QuantScheme | None:
        if any(re.search(p, name) for p in self.ignore):
            return None
        for pattern, scheme in self.overrides:
            if re.search(pattern, name):
                return scheme
        return self.default


ModuleDone = Callable[[str, QuantizedWeight, float], None]


class LayerMethod(Protocol):
    """A method quantizes the Linears of one decoder block.

    `forward(stop_after=())` runs the block (with its current weights) over the captured
    calibration inputs and returns its outputs; with `stop_after` (modules of the block), each
    input stops as soon as all of those modules have been called, and it returns None: their
    forward pre-hooks see their inputs, but the last one called does not run (nor anything
    after it). Methods that need statistics attach hooks (pre-hooks for a stopped pass) and
    call it, and must call it once in full before changing any weight (the
    walker keeps that pass as the block's float reference). Data-free methods
    (`needs_calibration = False`) get no inputs and must not call it.
    `on_module(name, qweight, error)` is called after each module.
    A method with a true `wants_float_inputs` attribute is also passed `float_inputs`: each
    Linear's inputs in the float model (fed its own, unquantized activations), per call;
    None while those are still the quantized model's (the first block).
    A method with a true `auto_bfloat16` attribute has its calibration forwards in bfloat16
    when a job's `forward_dtype` is "auto" and the device multiplies bfloat16 natively
    (quantcore.precision).
    """

    name: str
    needs_calibration: bool

    def quantize_block(
        self,
        block: nn.Module,
        modules: dict[str, tuple[nn.Linear, QuantScheme]],
        forward: Callable[..., list[torch.Tensor] | None],
        on_module: ModuleDone,
    ) -> dict[str, QuantizedWeight]: ...


def group_by_input(first_input: dict[str, torch.Tensor], names: Iterable[str]) -> list[list[str]]:
    """`names` grouped by the very tensor each first read (q/k/v; gate/up share one), the
    groups in the order of their first member in `names`."""
    groups: list[list[str]] = []
    for name in names:
        x = first_input[name]
        same = next((g for g in groups if first_input[g[0]] is x), None)
        if same is None:
            groups.append([name])
        else:
            same.append(name)
    return groups


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||ref - approx||^2 / ||ref||^2."""
    ref = ref.float()
    denom = ref.pow(2).sum().clamp_min(1e-30)
    return float((ref - approx.float()).pow(2).sum() / denom)


@torch.no_grad()
def install_quantized(linear: nn.Linear, qw: QuantizedWeight) -> float:
    """Replace `linear`'s weight by the dequantized `qw` (so later layers see the quantized
    model); returns the weight's relative error."""
    w = linear.weight.data
    deq = qw.dequantize(w.dtype)
    # In place, with no temporaries beyond `deq`: w briefly holds the rounding error.
    norm = float(torch.linalg.vector_norm(w, dtype=torch.float32)) ** 2
    diff = float(torch.linalg.vector_norm(w.sub_(deq), dtype=torch.float32)) ** 2
    w.copy_(deq)
    return diff / max(norm, 1e-30)
