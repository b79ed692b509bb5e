"""Resolve a Hub id + revision to a local snapshot directory (offline works from the cache)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from quantcore.errors import ModelNotFoundError
from quantcore.models.gguf import find_gguf, gguf_snapshot


def resolve_snapshot(
    model_id: str, revision: str = "main", on_convert: Callable[[str], None] | None = None
) -> Path:
    """A local directory holding the model's files.

    A local directory path is returned as is. A local `.gguf` file (or a directory holding one
    and no config.json) is converted once to a safetensors snapshot in a cache directory
    (`on_convert` hears about it). A Hub id is looked up in the Hub cache first; the network
    is used only when HF_HUB_OFFLINE is not set.
    """
    local = Path(model_id).expanduser()
    gguf = find_gguf(local)
    if gguf is not None:
        return gguf_snapshot(gguf, on_progress=on_convert)
    if local.suffix.lower() == ".gguf" and not local.exists():
        raise ModelNotFoundError(f"{local}: no such GGUF file")
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelNotFoundError(f"{local} is a directory but has no config.json")
        return local

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        path = snapshot_download(model_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as cached_err:
        if offline:
            raise ModelNotFoundError(
                f"model {model_id!r} at revision {revision!r} is not in the local Hub cache "
                f"({_cache_dir()}) and HF_HUB_OFFLINE is set; download it first "
                f"(`hf download {model_id} --revision {revision}`) or check the id"
            ) from cached_err
        try:
            path = snapshot_download(model_id, revision=revision)
        except (HfHubHTTPError, LocalEntryNotFoundError, ValueError) as e:
            raise ModelNotFoundError(
                f"model {model_id!r} at revision {revision!r} could not be fetched from the "
                f"Hub: {e}"
            ) from e
    return Path(path)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
