"""compressed-tensors `pack-quantized`: the tensors of one Linear and `quantization_config`.

Each quantized Linear `X` is stored as `X.weight_packed` (int32 codes packed along the input
dim), `X.weight_scale`, `X.weight_zero_point` (asymmetric only; packed along the output dim),
`X.weight_g_idx` (act-order with a group index only) and `X.weight_shape`. These are the very
bytes `qfkernels.QuantLinear` computes from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from qfkernels.packed_weight import PackedWeight
from qfkernels.packing import unpack_int32
from quantcore.formats import WeightScheme
from quantcore.qtensor import QuantizedWeight

SUFFIXES = frozenset(
    {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"}
)


def linear_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors of one quantized Linear in pack-quantized layout."""
    zeros = None if qw.symmetric else qw.zeros
    packed = PackedWeight.from_codes(qw.codes, qw.scales, zeros, qw.bits, qw.group_size, qw.g_idx)
    return packed.artifact_tensors(name)


def packed_weight(
    name: str, tensors: Mapping[str, torch.Tensor], scheme: WeightScheme
) -> PackedWeight:
    """The artifact's bytes of Linear `name` as the kernels read them."""
    gs = None if scheme.group_size == -1 else scheme.group_size
    return PackedWeight.from_artifact(name, tensors, scheme.bits, gs, scheme.symmetric)


def read_linear(
    name: str, tensors: Mapping[str, torch.Tensor], scheme: WeightScheme
) -> QuantizedWeight:
    """Inverse of `linear_tensors`: codes, scales, zero points and g_idx as written."""
    p = packed_weight(name, tensors, scheme)
    zeros = p.zeros
    if zeros is None:
        zeros = torch.full((p.out_features, p.n_groups), 1 << (p.bits - 1), dtype=torch.uint8)
    return QuantizedWeight(
        codes=unpack_int32(p.qweight, p.bits, p.in_features),
        scales=p.scales,
        zeros=zeros,
        bits=p.bits,
        group_size=p.group_size,
        symmetric=scheme.symmetric,
        g_idx=p.g_idx,
    )


def _weights_args(s: WeightScheme) -> dict:
    per_channel = s.group_size == -1
    return {
        "num_bits": s.bits,
        "type": "int",
        "symmetric": s.symmetric,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else s.group_size,
        "dynamic": False,
        "actorder": s.actorder,
        "observer": "minmax",
    }


def quantization_config(schemes: Mapping[str, WeightScheme], ignore: list[str]) -> dict:
    """`quantization_config` for config.json (compressed-tensors schema).

    `schemes`: quantized Linear name -> its scheme; `ignore`: the Linears left in floating
    point, by name. One scheme targets every Linear ("Linear"); mixed precision gets one
    config group per distinct scheme, each targeting its modules by exact name.
    """
    distinct = sorted(set(schemes.values()), key=lambda s: (s.bits, s.group_size, s.symmetric))
    groups = {}
    for i, s in enumerate(distinct):
        if len(distinct) == 1:
            targets = ["Linear"]
        else:
            targets = sorted(n for n, t in schemes.items() if t == s)
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": _weights_args(s),
            "input_activations": None,
            "output_activations": None,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }


def _scheme_from_args(w: dict) -> WeightScheme:
    gs = w.get("group_size")
    return WeightScheme(
        int(w["num_bits"]),
        -1 if gs in (None, -1) or w.get("strategy") == "channel" else int(gs),
        bool(w["symmetric"]),
        w.get("actorder"),
    )


def _target_rank(target: str, name: str) -> int | None:
    """How specifically `target` names module `name` (0 best), or None when it does not."""
    if target == name:
        return 0
    if target.startswith("re:") and re.match(target[3:], name):
        return 1
    if target == "Linear":
        return 2
    return None


def schemes_from_config(qconfig: dict, names: list[str]) -> dict[str, WeightScheme]:
    """Which scheme each quantized Linear in `names` has, by the config groups' targets: an
    exact name first, then a `re:` pattern, then the class name `Linear`."""
    groups = [
        (g["targets"], _scheme_from_args(g["weights"])) for g in qconfig["config_groups"].values()
    ]
    out = {}
    for name in names:
        ranked = [
            (rank, i)
            for i, (targets, _) in enumerate(groups)
            for t in targets
            if (rank := _target_rank(t, name)) is not None
        ]
        if not ranked:
            raise ValueError(f"{name} has packed weights but no config group targets it")
        out[name] = groups[min(ranked)[1]][1]
    return out
