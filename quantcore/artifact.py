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

from kernels.packing import pack_int32, unpack_int32
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
    out = {
        f"{name}.weight_packed": pack_int32(qw.codes, qw.bits),
        f"{name}.weight_scale": qw.scales.contiguous(),
        f"{name}.weight_shape": torch.tensor(qw.shape, dtype=torch.int32),
    }
    if not qw.symmetric:
        out[f"{name}.weight_zero_point"] = pack_int32(qw.zeros.t(), qw.bits).t().contiguous()
    if qw.g_idx is not None:
        out[f"{name}.weight_g_idx"] = qw.g_idx.to(torch.int32)
    return out


def unpack_quantized_tensors(
    name: str, tensors: dict[str, torch.Tensor], bits: int, group_size: int | None, symmetric: bool
) -> QuantizedWeight:
    out_f, in_f = (int(x) for x in tensors[f"{name}.weight_shape"])
    scales = tensors[f"{name}.weight_scale"]
    n_groups = scales.shape[1]
    if symmetric:
        zeros = torch.full((out_f, n_groups), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = unpack_int32(tensors[f"{name}.weight_zero_point"].t(), bits, out_f).t()
    g_idx = tensors.get(f"{name}.weight_g_idx")
    return QuantizedWeight(
        codes=unpack_int32(tensors[f"{name}.weight_packed"], bits, in_f),
        scales=scales,
        zeros=zeros.contiguous(),
        bits=bits,
        group_size=group_size or in_f,
        symmetric=symmetric,
        g_idx=g_idx,
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


def load_dequantized(artifact_dir: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the model from an artifact with each quantized Linear dequantized from the
    packed bytes. (QuantLinear over the packed bytes replaces this in the kernels issue.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(artifact_dir)
    qcfg = config.quantization_config
    del config.quantization_config
    weights = qcfg["config_groups"]["group_0"]["weights"]
    tensors = read_tensors(artifact_dir)
    state = {}
    for key in list(tensors):
        if key.endswith(".weight_packed"):
            name = key[: -len(".weight_packed")]
            qw = unpack_quantized_tensors(
                name, tensors, weights["num_bits"], weights["group_size"], weights["symmetric"]
            )
            state[f"{name}.weight"] = qw.dequantize()
    for key, t in tensors.items():
        if key.rsplit(".", 1)[-1] not in PACKED_SUFFIXES:
            state[key] = t
    dtype = dtype or next(t for t in state.values() if t.is_floating_point()).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"artifact {artifact_dir} does not match its config: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.eval()
    return model
