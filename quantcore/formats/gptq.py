"""GPTQ checkpoint layout (AutoGPTQ / GPTQModel / transformers' gptq path).

Per quantized Linear `X`: `X.qweight` int32 [K * bits / 32, N] (codes packed along the input
dim as one little-endian bit stream, so 3-bit codes straddle words), `X.qzeros` int32
[G, N * bits / 32] (zero points packed the same way along the output dim), `X.scales` [G, N],
`X.g_idx` int32 [K] (the group of each input column). Checkpoint format `gptq` (v1) stores
zero points minus one, which only round-trips for symmetric weights (an asymmetric zero of 0
would underflow); `gptq_v2` stores them as they are and is written whenever a weight is
asymmetric.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from quantcore.formats import WeightScheme
from quantcore.qtensor import QuantizedWeight

SUFFIXES = frozenset({"qweight", "qzeros", "scales", "g_idx"})
GPTQ_BITS = (2, 3, 4, 8)


def pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last dim into int32 words, code i at bit i * bits of a
    little-endian stream (a code may straddle two words). The last dim must fill whole words."""
    n = codes.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    c = codes.to(torch.int64)
    offset = torch.arange(n, device=codes.device) * bits
    word, shift = offset // 32, offset % 32
    out = torch.zeros(*codes.shape[:-1], n * bits // 32, dtype=torch.int64, device=codes.device)
    # Bits of different codes never overlap, so adding them is OR-ing them.
    out.index_add_(-1, word, (c << shift) & 0xFFFFFFFF)
    spill = shift + bits > 32
    if bool(spill.any()):
        out.index_add_(-1, word[spill] + 1, c[..., spill] >> (32 - shift[spill]))
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_bitstream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bitstream`: the `n` codes of the last dim, as uint8."""
    if words.shape[-1] * 32 != n * bits:
        raise ValueError(f"{words.shape[-1]} words do not hold exactly {n} codes of {bits} bits")
    w = words.to(torch.int64) & 0xFFFFFFFF
    offset = torch.arange(n, device=words.device) * bits
    word, shift = offset // 32, offset % 32
    lo = w[..., word] >> shift
    nxt = torch.clamp(word + 1, max=w.shape[-1] - 1)
    hi = torch.where(shift + bits > 32, w[..., nxt] << (32 - shift), torch.zeros_like(lo))
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.uint8)


def check_packable(name: str, qw: QuantizedWeight) -> None:
    """GPTQ packs whole words along both dims: refuse shapes it cannot hold, naming why."""
    n, k = qw.shape
    if qw.bits not in GPTQ_BITS:
        raise ValueError(f"{name}: GPTQ has no {qw.bits}-bit layout; supported: {GPTQ_BITS}")
    for what, dim in (("in_features", k), ("out_features", n)):
        if (dim * qw.bits) % 32:
            raise ValueError(
                f"{name}: {what}={dim} of {qw.bits}-bit codes does not fill whole int32 words, "
                "which the GPTQ layout needs; write format 'pack-quantized' instead"
            )


def linear_tensors(name: str, qw: QuantizedWeight, v2: bool) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one quantized Linear; `v2` stores zero points as they are."""
    check_packable(name, qw)
    zeros = qw.zeros.to(torch.int64)
    if not v2:
        if not qw.symmetric:
            raise ValueError(f"{name}: asymmetric weights need checkpoint format gptq_v2")
        zeros = zeros - 1
    return {
        f"{name}.qweight": pack_bitstream(qw.codes, qw.bits).t().contiguous(),
        f"{name}.qzeros": pack_bitstream(zeros.t().contiguous(), qw.bits),
        f"{name}.scales": qw.scales.t().contiguous(),
        f"{name}.g_idx": qw.group_index().to(torch.int32).contiguous(),
    }


def read_linear(
    name: str, tensors: Mapping[str, torch.Tensor], scheme: WeightScheme, v2: bool
) -> QuantizedWeight:
    """Inverse of `linear_tensors`. A g_idx that is just column // group_size reads back as
    None (static groups), as the writer's input had it."""
    bits = scheme.bits
    g_idx = tensors[f"{name}.g_idx"].to(torch.int32)
    scales = tensors[f"{name}.scales"].t().contiguous()
    k, n = g_idx.numel(), scales.shape[0]
    codes = unpack_bitstream(tensors[f"{name}.qweight"].t().contiguous(), bits, k)
    zeros = unpack_bitstream(tensors[f"{name}.qzeros"], bits, n).t().to(torch.int64)
    if not v2:
        zeros = (zeros + 1) & ((1 << bits) - 1)
    group_size = k if scheme.group_size == -1 else scheme.group_size
    static = torch.equal(g_idx.long(), torch.arange(k) // group_size)
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
        symmetric=scheme.symmetric,
        g_idx=None if static else g_idx,
    )


def _module_regex(name: str) -> str:
    return "^" + name.replace(".", r"\.") + "$"


def quantize_config(
    schemes: Mapping[str, WeightScheme], ignore: list[str], recipe: dict | None = None
) -> dict:
    """`quantize_config.json` (also config.json's `quantization_config`).

    The most common scheme is the default; modules with another one get a GPTQModel
    `dynamic` override (`+:^name$`), and Linears left in floating point a `-:^name$` skip.
    """
    counts: dict[WeightScheme, int] = {}
    for s in schemes.values():
        counts[s] = counts.get(s, 0) + 1
    default = max(sorted(counts), key=lambda s: counts[s])
    v2 = any(not s.symmetric for s in schemes.values())
    dynamic: dict[str, dict] = {}
    for name in sorted(schemes):
        s = schemes[name]
        if s != default:
            dynamic["+:" + _module_regex(name)] = {
                "bits": s.bits,
                "group_size": s.group_size,
                "sym": s.symmetric,
                "desc_act": s.actorder == "group",
            }
    for name in sorted(ignore):
        dynamic["-:" + _module_regex(name)] = {}
    options = (recipe or {}).get("method_options", {})
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
        "bits": default.bits,
        "group_size": default.group_size,
        "sym": default.symmetric,
        # desc_act means a real g_idx permutation; static act-order keeps groups contiguous.
        "desc_act": default.actorder == "group",
        "static_groups": default.actorder == "weight",
        "true_sequential": bool(options.get("true_sequential", True)),
        "damp_percent": float(options.get("damp", 0.01)),
        "lm_head": False,
        "pack_dtype": "int32",
        "dynamic": dynamic or None,
        "meta": {"quantizer": ["quantfoundry"]},
    }


def schemes_from_config(qconfig: dict, names: list[str]) -> dict[str, WeightScheme]:
    """Each quantized Linear's scheme: the default, or its `+:` dynamic override."""
    import re

    default = WeightScheme(
        int(qconfig["bits"]),
        int(qconfig["group_size"]),
        bool(qconfig["sym"]),
        "group" if qconfig.get("desc_act") else None,
    )
    overrides = []
    for key, v in (qconfig.get("dynamic") or {}).items():
        if key.startswith("+:"):
            s = WeightScheme(
                int(v.get("bits", default.bits)),
                int(v.get("group_size", default.group_size)),
                bool(v.get("sym", default.symmetric)),
                "group" if v.get("desc_act") else None,
            )
            overrides.append((re.compile(key[2:]), s))
    out = {}
    for name in names:
        out[name] = next((s for rx, s in overrides if rx.search(name)), default)
    return out


def is_v2(qconfig: dict) -> bool:
    return qconfig.get("checkpoint_format", "gptq") == "gptq_v2"
