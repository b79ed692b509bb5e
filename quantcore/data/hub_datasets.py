"""Calibration and evaluation text from Hub datasets, read with the optional `datasets`
package (`pip install 'quantfoundry[hub-data]'`). Offline, or without the package, a request
for one fails with a BadRequestError that says which."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from quantcore.errors import BadRequestError


@dataclass(frozen=True)
class HubDataset:
    repo: str
    config: str | None
    splits: dict[str, str]  # our split ("calibration", "evaluation") -> the dataset's split
    text_field: str = "text"
    data_files: dict[str, str] = field(default_factory=dict)


HUB_DATASETS = {
    "wikitext2": HubDataset(
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        {"calibration": "train", "evaluation": "test"},
    ),
    # One shard of English C4, as the GPTQ and AWQ papers sample from.
    "c4": HubDataset(
        "allenai/c4",
        None,
        {"calibration": "train", "evaluation": "validation"},
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
    "pileval": HubDataset("mit-han-lab/pile-val-backup", None, {"calibration": "validation"}),
}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes")


def load_documents(name: str, split: str) -> list[str]:
    """The documents of Hub dataset `name` for our `split`, in the dataset's order."""
    spec = HUB_DATASETS[name]
    if split not in spec.splits:
        raise BadRequestError(
            f"dataset {name!r} has no {split} split here; use it for "
            f"{' and '.join(spec.splits)} only"
        )
    try:
        import datasets
    except ImportError as e:
        raise BadRequestError(
            f"dataset {name!r} ({spec.repo}) is read from the Hugging Face Hub with the "
            "`datasets` package, which is not installed: pip install 'quantfoundry[hub-data]' "
            "(or use wiki-excerpt or a calibration file)"
        ) from e
    kwargs = {"data_files": spec.data_files} if spec.data_files else {}
    try:
        ds = datasets.load_dataset(spec.repo, spec.config, split=spec.splits[split], **kwargs)
    except Exception as e:  # the library's errors for no network / not cached vary by version
        offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
        raise BadRequestError(
            f"dataset {name!r} ({spec.repo}) needs network access to the Hugging Face Hub"
            f"{offline} and is not in the local datasets cache: {type(e).__name__}: {e}. "
            "Use wiki-excerpt or a calibration file, or run where the Hub is reachable"
        ) from e
    return [t for t in ds[spec.text_field] if t and t.strip()]
