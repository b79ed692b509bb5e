"""GGUF files as a model source: converted once (dequantized by transformers) to a float
safetensors snapshot in a cache directory, which is then used like any other snapshot.

Conversion holds the whole model in memory once (transformers dequantizes the GGUF tensors
into a full model); later runs find the converted snapshot and read it block by block.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from quantcore.errors import ModelNotFoundError, UnsupportedModelError

CONVERSION = "v1"  # bump when convert_gguf's output changes, so old conversions are redone


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the single .gguf in a directory that
    has no config.json. None when `path` is not a GGUF source."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelNotFoundError(
            f"{path} holds several GGUF files ({names}); name the one to quantize by its path"
        )
    return found[0] if found else None


def cache_root() -> Path:
    return Path(os.environ.get("QF_HOME", Path.home() / ".cache" / "quantfoundry")) / "gguf"


def _key(gguf: Path) -> str:
    """Identifies the file's content cheaply: path, size and modification time."""
    st = gguf.stat()
    raw = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{CONVERSION}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, out_dir: Path, name_or_path: str | None = None) -> None:
    """Load a GGUF with transformers (dequantizing) and save it as a float safetensors dir
    with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UnsupportedModelError(
            f"{gguf.name}: transformers cannot read this GGUF file ({type(e).__name__}: {e})"
        ) from e
    # The loaded weights are plain floats; drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name_or_path or gguf.stem
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def gguf_snapshot(
    gguf: Path, root: Path | None = None, on_progress: Callable[[str], None] | None = None
) -> Path:
    """The converted snapshot of `gguf` under `root` (converted now if it is not there)."""
    root = root or cache_root()
    target = root / f"{gguf.stem}-{_key(gguf)}"
    if (target / "config.json").exists():
        return target
    if on_progress is not None:
        on_progress(f"converting {gguf.name} to safetensors (once; cached in {root})")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".converting-"))
    try:
        convert_gguf(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
