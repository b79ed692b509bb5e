"""A model whose weights stay in the snapshot's safetensors shards until a part is needed.

The skeleton is built with every parameter on the meta device (no memory); buffers that the
model computes itself (rotary frequencies, embedding scales) are real. `materialize(module)`
reads that module's tensors one by one from the shards onto a device, `release(module)` puts
them back on the meta device. Parameters are swapped in place (`torch.utils.swap_tensors`), so
a tied pair (lm_head and embed_tokens) stays one object and loads once.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from quantcore.errors import ModelNotFoundError, UnsupportedModelError

INDEX = "model.safetensors.index.json"


def tensor_files(snapshot: Path) -> dict[str, Path]:
    """Each stored tensor's shard: from the index, or by listing the safetensors files."""
    index = snapshot / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: snapshot / v for k, v in weight_map.items()}
    files = sorted(snapshot.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in snapshot.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (it has {', '.join(found)}: convert them to safetensors)" if found else ""
        raise ModelNotFoundError(f"{snapshot} holds no safetensors weights{hint}")
    out: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), path))  # noqa: SIM118
    return out


def stored_dtype(files: dict[str, Path]) -> torch.dtype:
    """The dtype of the first floating tensor stored (what from_pretrained's "auto" falls
    back to when the config names none)."""
    for name, path in files.items():
        with safe_open(path, framework="pt") as f:
            t = f.get_slice(name)
            dtype = getattr(torch, _SAFETENSORS_DTYPES.get(t.get_dtype(), ""), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return torch.float32


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _config_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def build_skeleton(snapshot: Path, config=None, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of `snapshot` with its parameters on the meta device, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or AutoConfig.from_pretrained(snapshot)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        kind = getattr(config, "model_type", "?")
        raise UnsupportedModelError(
            f"{snapshot.name}: transformers has no causal-LM class for model_type {kind!r} "
            f"({type(config).__name__}); only decoder-only causal LMs are supported ({e})"
        ) from e
    model.tie_weights()
    return model.eval()


def return_freed_memory() -> None:
    """Hand memory freed by a released block back to the OS. glibc keeps freed blocks of this
    size in its heap (its mmap threshold rises after large frees), so without this the
    process grows by a fraction of a block per layer although nothing is alive."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


class LazyModel:
    """A skeleton model and the shards its weights come from."""

    def __init__(self, snapshot: Path, dtype: torch.dtype | str = "auto") -> None:
        from transformers import AutoConfig

        self.snapshot = Path(snapshot)
        self.files = tensor_files(self.snapshot)
        config = AutoConfig.from_pretrained(self.snapshot)
        if dtype == "auto":
            dtype = _config_dtype(config) or stored_dtype(self.files)
        self.dtype: torch.dtype = dtype  # type: ignore[assignment]
        self.model = build_skeleton(self.snapshot, config, self.dtype)
        # Every name a tensor object answers to (tied weights have several), by identity.
        self._names: dict[int, list[str]] = defaultdict(list)
        for name, t in self.model.named_parameters(remove_duplicate=False):
            self._names[id(t)].append(name)
        for name, t in self.model.named_buffers(remove_duplicate=False):
            self._names[id(t)].append(name)

    def stored_name(self, t: torch.Tensor) -> str | None:
        """The name under which the snapshot stores `t` (one of its tied aliases), if any."""
        return next((n for n in self._names.get(id(t), []) if n in self.files), None)

    def _tensors(self, module: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
        """(stored name, tensor, is parameter) for `module`'s parameters and stored buffers."""
        out = []
        for t in module.parameters():
            name = self.stored_name(t)
            if name is None:
                names = ", ".join(self._names.get(id(t), ["?"]))
                raise UnsupportedModelError(
                    f"{self.snapshot.name}: the model needs {names} but the snapshot's "
                    "safetensors files do not store it (renamed or missing weights)"
                )
            out.append((name, t, True))
        for t in module.buffers():
            name = self.stored_name(t)
            if name is not None:
                out.append((name, t, False))
        return out

    @torch.no_grad()
    def materialize(self, module: nn.Module, device: str | torch.device = "cpu") -> list[str]:
        """Read `module`'s weights from the shards onto `device`; returns their stored names.
        Each shard is opened only for the call, so nothing stays mapped afterwards."""
        wanted = self._tensors(module)
        by_file: dict[Path, list[tuple[str, torch.Tensor, bool]]] = defaultdict(list)
        for item in wanted:
            if item[1].is_meta or not item[2]:
                by_file[self.files[item[0]]].append(item)
        for path, items in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name, t, is_param in items:
                    value = f.get_tensor(name)
                    dtype = t.dtype if value.is_floating_point() else value.dtype
                    if tuple(value.shape) != tuple(t.shape):
                        raise UnsupportedModelError(
                            f"{self.snapshot.name}: {name} is stored as {tuple(value.shape)} "
                            f"but the model expects {tuple(t.shape)}"
                        )
                    # Always a copy: safetensors maps the file privately, and the walk
                    # writes into every weight (AWQ's candidates, folds, GPTQ's result); the
                    # first write to each page of a mapped tensor faults it in from the file
                    # (3.5 MB, a gate_proj: about 10 ms against 1 ms to copy it whole).
                    value = value.to(device=device, dtype=dtype, copy=True)
                    if is_param:
                        new = nn.Parameter(value, requires_grad=False)
                        torch.utils.swap_tensors(t, new)
                    else:
                        t.data = value
        return [n for n, _, _ in wanted]

    @torch.no_grad()
    def release(self, module: nn.Module) -> None:
        """Drop `module`'s parameters (back to the meta device) and return their memory."""
        for t in module.parameters():
            if not t.is_meta:
                meta = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
                torch.utils.swap_tensors(t, meta)
                del meta
        return_freed_memory()

    def outside(self, blocks: nn.ModuleList) -> list[nn.Module]:
        """The modules holding parameters outside the decoder blocks (embeddings, final norm,
        the output head), as the smallest modules that own them."""
        inside = {id(p) for p in blocks.parameters()}
        out = []
        for _, mod in self.model.named_modules():
            own = [p for p in mod.parameters(recurse=False) if id(p) not in inside]
            if own:
                out.append(mod)
        return out
