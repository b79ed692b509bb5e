"""Resolve a Hub id + revision to a local snapshot directory (offline works from the cache)."""

from __future__ import annotations

import os
from pathlib import Path

from quantcore.errors import ModelNotFoundError


def resolve_snapshot(model_id: str, revision: str = "main") -> Path:
    """A local directory holding the model's files.

    A local directory path is returned as is. A Hub id is looked up in the Hub cache first;
    the network is used only when HF_HUB_OFFLINE is not set.
    """
    local = Path(model_id).expanduser()
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
