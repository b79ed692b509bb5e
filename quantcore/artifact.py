"""Write and read a quantized model directory in compressed-tensors `pack-quantized` layout.

Each quantized Linear `X` is stored as `X.weight_packed` (int32 codes packed along the input
dim), `X.weight_scale`, `X.weight_zero_point` (asymmetric only; packed along the output dim)
and `X.weight_shape`. Everything else is stored as is. The directory also carries the
tokenizer, the recipe and a manifest with each file's size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kernels.packed_weight import PackedWeight, packed_weights_from_artifact
from kernels.packing import unpack_int32
from kernels.quant_linear import Backend, replace_linears
from quantcore.qtensor import QuantizedWeight

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".gguf", ".msgpack", ".h5")
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
MAX_SHARD_BYTES = 2 * 1024**3
PACKED_SUFFIXES = {
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
}


def pack_quantized_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors of one quantized Linear in pack-quantized layout."""
    zeros = None if qw.symmetric else qw.zeros
    packed = PackedWeight.from_codes(qw.codes, qw.scales, zeros, qw.bits, qw.group_size, qw.g_idx)
    return packed.artifact_tensors(name)


def unpack_quantized_tensors(
    name: str, tensors: dict[str, torch.Tensor], bits: int, group_size: int | None, symmetric: bool
) -> QuantizedWeight:
    p = PackedWeight.from_artifact(name, tensors, bits, group_size, symmetric)
    zeros = p.zeros
    if zeros is None:
        zeros = torch.full((p.out_features, p.n_groups), 1 << (bits - 1), dtype=torch.uint8)
    return QuantizedWeight(
        codes=unpack_int32(p.qweight, bits, p.in_features),
        scales=p.scales,
        zeros=zeros,
        bits=bits,
        group_size=p.group_size,
        symmetric=symmetric,
        g_idx=p.g_idx,
    )


def quantization_config(
    bits: int, group_size: int, symmetric: bool, ignore: list[str], actorder: str | None = None
) -> dict:
    """`quantization_config` for config.json (compressed-tensors schema)."""
    per_channel = group_size == -1
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": symmetric,
                    "strategy": "channel" if per_channel else "group",
                    "group_size": None if per_channel else group_size,
                    "dynamic": False,
                    "actorder": actorder,
                    "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def _state_without_ties(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent tensors, each stored once (tied weights keep their first name)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def _write_shards(tensors: dict[str, torch.Tensor], out_dir: Path) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / fname, metadata={"format": "pt"})
        names.append(fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ArtifactInfo:
    path: Path
    total_bytes: int
    files: dict[str, dict]


def write_artifact(
    model: nn.Module,
    quantized: dict[str, QuantizedWeight],
    source_dir: Path,
    out_dir: Path,
    scheme: tuple[int, int, bool],
    ignore: list[str],
    recipe: dict,
    actorder: str | None = None,
) -> ArtifactInfo:
    """Write `model` with its `quantized` Linears packed, plus tokenizer, recipe and manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bits, group_size, symmetric = scheme
    tensors = _state_without_ties(model)
    for name, qw in quantized.items():
        del tensors[f"{name}.weight"]
        tensors.update(pack_quantized_tensors(name, qw))
    _write_shards(tensors, out_dir)

    config = json.loads((source_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(
        bits, group_size, symmetric, ignore, actorder
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for f in source_dir.iterdir():
        if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_FILES):
            shutil.copyfile(f, out_dir / f.name)
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2))

    files = {
        f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(out_dir.iterdir())
        if f.is_file() and f.name != "manifest.json"
    }
    (out_dir / "manifest.json").write_text(json.dumps({"files": files}, indent=2))
    total = sum(v["size"] for v in files.values())
    return ArtifactInfo(out_dir, total, files)


def read_tensors(artifact_dir: Path) -> dict[str, torch.Tensor]:
    index = artifact_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for s in shards:
        tensors.update(load_file(artifact_dir / s))
    return tensors


def _weights_config(config) -> dict:
    return config.quantization_config["config_groups"]["group_0"]["weights"]


def _build(artifact_dir: Path, state: dict[str, torch.Tensor], config, dtype, expect_missing):
    """The model of `config` with `state` loaded; only `expect_missing` may be absent."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or next(t for t in state.values() if t.is_floating_point()).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    missing = [k for k in result.missing_keys if k not in tied and k not in expect_missing]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"artifact {artifact_dir} does not match its config: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.eval()
    return model


def _read(artifact_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(artifact_dir)
    weights = _weights_config(config)
    del config.quantization_config
    tensors = read_tensors(artifact_dir)
    plain = {k: t for k, t in tensors.items() if k.rsplit(".", 1)[-1] not in PACKED_SUFFIXES}
    return config, weights, tensors, plain


def load_quantized(
    artifact_dir: Path, backend: Backend = "auto", dtype: torch.dtype | None = None
) -> nn.Module:
    """The model with every quantized Linear a `QuantLinear` over the artifact's packed bytes:
    the published bytes are the ones computed with (Triton on CUDA, the reference on CPU)."""
    config, weights, tensors, plain = _read(artifact_dir)
    packed = packed_weights_from_artifact(
        tensors, weights["num_bits"], weights["group_size"], weights["symmetric"]
    )
    model = _build(artifact_dir, plain, config, dtype, {f"{n}.weight" for n in packed})
    replace_linears(model, packed, backend)
    return model


def load_dequantized(artifact_dir: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The model with each quantized Linear's weight dequantized from the packed bytes (a plain
    transformers model; the oracle for `load_quantized`)."""
    config, weights, tensors, state = _read(artifact_dir)
    for key in tensors:
        if key.endswith(".weight_packed"):
            name = key[: -len(".weight_packed")]
            qw = unpack_quantized_tensors(
                name, tensors, weights["num_bits"], weights["group_size"], weights["symmetric"]
            )
            state[f"{name}.weight"] = qw.dequantize()
    return _build(artifact_dir, state, config, dtype, set())
