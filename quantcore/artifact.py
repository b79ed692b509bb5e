"""Write and read a quantized model directory: sharded safetensors with an index, config.json
with `quantization_config`, tokenizer and generation config, the recipe, a model card and a
manifest with each file's size and sha256.

The writer streams: every tensor that is neither quantized nor replaced is read from the
snapshot's shards one at a time and goes to its output shard's file at once, so peak memory
is one tensor (plus whatever the caller's `quantized` mapping holds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from qfkernels.packed_weight import PackedWeight
from qfkernels.quant_linear import Backend, replace_linears
from quantcore.formats import FORMATS, WeightScheme, gptq, pack_quantized, scheme_of
from quantcore.formats.safetensors_stream import StreamingSafetensors
from quantcore.qtensor import QuantizedWeight

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx")
# Files of the base repo that the artifact writes itself, or that describe the base repo only.
SKIP_FILES = {
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "quantize_config.json",
    "recipe.json",
    "manifest.json",
    "README.md",
    ".gitattributes",
}
MAX_SHARD_BYTES = 2 * 1024**3
INDEX = "model.safetensors.index.json"
# (done, total, message) while writing.
WriteProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ArtifactInfo:
    path: Path
    format: str
    total_bytes: int
    files: dict[str, dict]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot_shards(snapshot: Path) -> list[Path]:
    """The snapshot's safetensors files, in index order."""
    index = snapshot / INDEX
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [snapshot / n for n in names]
    single = snapshot / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(snapshot.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{snapshot} holds no safetensors weights")
    return found


class _ShardWriter:
    """Streams tensors into shards of at most `max_bytes`: each tensor is on disk once added,
    so memory holds one tensor, not one shard."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.current: StreamingSafetensors | None = None
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.current is not None and self.current.nbytes + nbytes > self.max_bytes:
            self.flush()
        if self.current is None:
            part = self.out_dir / f".part-{len(self.parts):05d}.safetensors"
            self.current = StreamingSafetensors(part, metadata={"format": "pt"})
        self.current.add(name, t)
        self.total += nbytes

    def flush(self) -> None:
        if self.current is None:
            return
        self.current.close()
        self.parts.append((self.current.path, self.current.names()))
        self.current = None

    def finish(self) -> list[str]:
        """Name the shards (`model.safetensors`, or `model-0000k-of-0000n` with an index)."""
        self.flush()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for k, (part, keys) in enumerate(self.parts, 1):
            fname = f"model-{k:05d}-of-{len(self.parts):05d}.safetensors"
            part.rename(self.out_dir / fname)
            names.append(fname)
            weight_map.update(dict.fromkeys(keys, fname))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))
        return names


def _linear_names(config) -> list[str]:
    """Every nn.Linear of the model `config` describes (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _config_ignore(config, quantized: set[str], ignore: list[str]) -> list[str]:
    """The Linears left in floating point, by exact name (what compressed-tensors, vLLM and
    GPTQModel match), or the request's patterns as `re:` when the model cannot be built."""
    try:
        return [n for n in _linear_names(config) if n not in quantized]
    except Exception:  # an architecture transformers cannot build: patterns still say it
        return ["re:" + p for p in ignore]


def write_manifest(out_dir: Path, fmt: str) -> ArtifactInfo:
    """manifest.json: each other file's size and sha256."""
    files = {
        str(f.relative_to(out_dir)): {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(out_dir.rglob("*"))
        if f.is_file() and f.name != "manifest.json"
    }
    total = sum(v["size"] for v in files.values())
    manifest = {"format": fmt, "total_bytes": total, "files": files}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ArtifactInfo(out_dir, fmt, total, files)


def write_model_card(out_dir: Path, snapshot: Path, card: dict) -> ArtifactInfo:
    """(Re)write README.md from `card` (see quantcore.model_card) and refresh the manifest."""
    from quantcore.model_card import render_card

    fmt = json.loads((out_dir / "manifest.json").read_text())["format"]
    (out_dir / "README.md").write_text(render_card(snapshot, {"format": fmt, **card}))
    return write_manifest(out_dir, fmt)


def _prepare(out_dir: Path) -> Path:
    """A fresh `<out_dir>.partial`; refuses to replace a directory that is not an artifact."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise FileExistsError(f"{out_dir} exists and is not an artifact; choose an empty path")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():  # left by a killed run
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def write_artifact(
    out_dir: Path,
    snapshot: Path,
    quantized: Mapping[str, QuantizedWeight],
    replaced: Mapping[str, torch.Tensor],
    *,
    fmt: str = "pack-quantized",
    ignore: list[str],
    recipe: dict,
    actorder: str | None = None,
    card: dict | None = None,
    on_progress: WriteProgress | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> ArtifactInfo:
    """Write the artifact of `snapshot` with `quantized` Linears packed in `fmt`.

    `quantized`: Linear name -> QuantizedWeight (each item is read once, so a lazy mapping
    keeps memory bounded); `replaced`: full tensor name -> float tensor that differs from
    the snapshot (AWQ-folded norms); `ignore`: the request's ignore patterns; `actorder`:
    "weight" for static act-order groups. The directory appears complete or not at all
    (written as `<out_dir>.partial`, then renamed).
    """
    from transformers import AutoConfig

    if fmt not in FORMATS:
        raise ValueError(f"unknown artifact format {fmt!r}; available: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    work = _prepare(out_dir)
    shards = _ShardWriter(work, max_shard_bytes)
    schemes: dict[str, WeightScheme] = {}
    config_dict = json.loads((snapshot / "config.json").read_text())
    # The asymmetric check reads each weight's flag only (a lazy mapping loads on access).
    v2 = fmt == "gptq" and any(not quantized[n].symmetric for n in quantized)
    paths = snapshot_shards(snapshot)
    keys = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            keys[path] = list(f.keys())
    stored = {k for ks in keys.values() for k in ks}
    extra_r = sorted(set(replaced) - stored)
    # A quantized Linear the snapshot does not store: a tied lm_head. It gets its own packed
    # weight, so the tie must go (the embeddings stay in floating point).
    extra_q = sorted(n for n in quantized if f"{n}.weight" not in stored)
    total = len(stored) + len(extra_r) + len(extra_q)
    done = 0

    def add(name: str, tensors: Callable[[], dict[str, torch.Tensor]]) -> None:
        nonlocal done
        for k, t in tensors().items():
            shards.add(k, t)
        done += 1
        if on_progress is not None and (done % 50 == 0 or done == total):
            on_progress(done, total, f"wrote {name}")

    def packed(module: str) -> dict[str, torch.Tensor]:
        qw = quantized[module]
        schemes[module] = scheme_of(qw, actorder)
        if fmt == "gptq":
            return gptq.linear_tensors(module, qw, v2)
        return pack_quantized.linear_tensors(module, qw)

    for path in paths:
        with safe_open(path, framework="pt") as f:
            for key in keys[path]:
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module in quantized:
                    add(module, lambda m=module: packed(m))
                elif key in replaced:
                    add(key, lambda k=key: {k: replaced[k]})
                else:
                    add(key, lambda k=key, f=f: {k: f.get_tensor(k)})
    for key in extra_r:
        add(key, lambda k=key: {k: replaced[k]})
    for module in extra_q:
        add(module, lambda m=module: packed(m))
    shards.finish()

    config = AutoConfig.from_pretrained(snapshot)
    if extra_q and config_dict.get("tie_word_embeddings"):
        config_dict["tie_word_embeddings"] = False
        config.tie_word_embeddings = False
    ignored = _config_ignore(config, set(quantized), ignore)
    if fmt == "gptq":
        qconfig = gptq.quantize_config(schemes, ignored, recipe.get("quantfoundry"))
        (work / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
    else:
        qconfig = pack_quantized.quantization_config(schemes, ignored)
    config_dict["quantization_config"] = qconfig
    (work / "config.json").write_text(json.dumps(config_dict, indent=2))
    for f in snapshot.iterdir():
        if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_FILES):
            shutil.copyfile(f, work / f.name)
    (work / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
    write_manifest(work, fmt)
    if card is not None:
        write_model_card(work, snapshot, card)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return read_info(out_dir)


def read_info(artifact_dir: Path) -> ArtifactInfo:
    m = json.loads((artifact_dir / "manifest.json").read_text())
    return ArtifactInfo(artifact_dir, m["format"], m["total_bytes"], m["files"])


# --- reading ---


def pack_quantized_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one Linear (see quantcore.formats.pack_quantized)."""
    return pack_quantized.linear_tensors(name, qw)


def unpack_quantized_tensors(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    group_size: int | None,
    symmetric: bool,
) -> QuantizedWeight:
    gs = -1 if group_size in (None, -1) else group_size
    return pack_quantized.read_linear(name, tensors, WeightScheme(bits, gs, symmetric))


def read_tensors(artifact_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for s in snapshot_shards(artifact_dir):
        tensors.update(load_file(s))
    return tensors


def artifact_format(qconfig: dict) -> str:
    method = qconfig.get("quant_method")
    if method == "compressed-tensors":
        return "pack-quantized"
    if method == "gptq":
        return "gptq"
    raise ValueError(f"quantization_config.quant_method {method!r} is not one this reads")


@dataclass
class _Artifact:
    config: object  # transformers config, quantization_config removed
    qconfig: dict
    fmt: str
    tensors: dict[str, torch.Tensor]
    schemes: dict[str, WeightScheme]

    def plain(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not part of a quantized Linear's packed weight."""
        suffixes = gptq.SUFFIXES if self.fmt == "gptq" else pack_quantized.SUFFIXES
        out = {}
        for k, t in self.tensors.items():
            module, _, suffix = k.rpartition(".")
            if not (suffix in suffixes and module in self.schemes):
                out[k] = t
        return out

    def quantized(self, name: str) -> QuantizedWeight:
        if self.fmt == "gptq":
            return gptq.read_linear(
                name, self.tensors, self.schemes[name], gptq.is_v2(self.qconfig)
            )
        return pack_quantized.read_linear(name, self.tensors, self.schemes[name])

    def packed(self, name: str) -> PackedWeight:
        if self.fmt == "gptq":  # GPTQ's transposed layout is repacked once, codes unchanged
            qw = self.quantized(name)
            zeros = None if qw.symmetric else qw.zeros
            return PackedWeight.from_codes(
                qw.codes, qw.scales, zeros, qw.bits, qw.group_size, qw.g_idx
            )
        return pack_quantized.packed_weight(name, self.tensors, self.schemes[name])


def _read(artifact_dir: Path) -> _Artifact:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(artifact_dir)
    qconfig = config.quantization_config
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    del config.quantization_config
    fmt = artifact_format(qconfig)
    tensors = read_tensors(artifact_dir)
    marker = ".qweight" if fmt == "gptq" else ".weight_packed"
    names = [k.removesuffix(marker) for k in tensors if k.endswith(marker)]
    if fmt == "gptq":
        schemes = gptq.schemes_from_config(qconfig, names)
    else:
        schemes = pack_quantized.schemes_from_config(qconfig, names)
    return _Artifact(config, qconfig, fmt, tensors, schemes)


def read_quantized(artifact_dir: Path) -> dict[str, QuantizedWeight]:
    """Our own loader: every quantized Linear's codes, scales, zero points and g_idx, as
    written (either format)."""
    art = _read(artifact_dir)
    return {name: art.quantized(name) for name in art.schemes}


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


def load_quantized(
    artifact_dir: Path, backend: Backend = "auto", dtype: torch.dtype | None = None
) -> nn.Module:
    """The model with every quantized Linear a `QuantLinear` over the artifact's packed bytes:
    the published bytes are the ones computed with (Triton on CUDA, the reference on CPU).
    Mixed precision: each Linear with its own scheme."""
    art = _read(artifact_dir)
    packed = {name: art.packed(name) for name in art.schemes}
    model = _build(artifact_dir, art.plain(), art.config, dtype, {f"{n}.weight" for n in packed})
    replace_linears(model, packed, backend)
    return model


def load_dequantized(artifact_dir: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The model with each quantized Linear's weight dequantized from the packed bytes (a plain
    transformers model; the oracle for `load_quantized`)."""
    art = _read(artifact_dir)
    state = art.plain()
    for name in art.schemes:
        state[f"{name}.weight"] = art.quantized(name).dequantize()
    return _build(artifact_dir, state, art.config, dtype, set())
