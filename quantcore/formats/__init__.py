"""Artifact formats, each written from `QuantizedWeight` by small pure functions:
compressed-tensors `pack-quantized` (primary) and GPTQ (v1 symmetric, v2 asymmetric)."""

from __future__ import annotations

from dataclasses import dataclass

from quantcore.qtensor import QuantizedWeight

FORMATS = ("pack-quantized", "gptq")


@dataclass(frozen=True, order=True)
class WeightScheme:
    """What a format's config says about one quantized Linear. `group_size` is -1 for
    per-channel; `actorder` is None, "weight" (static groups) or "group" (a g_idx)."""

    bits: int
    group_size: int
    symmetric: bool
    actorder: str | None = None


def scheme_of(qw: QuantizedWeight, static_actorder: str | None = None) -> WeightScheme:
    """The scheme of one quantized weight; a group as wide as the input is per-channel."""
    per_channel = qw.g_idx is None and qw.group_size >= qw.shape[1]
    actorder = "group" if qw.g_idx is not None else static_actorder
    return WeightScheme(qw.bits, -1 if per_channel else qw.group_size, qw.symmetric, actorder)
