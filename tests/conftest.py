"""Shared fixtures: a per-run home for data, and the tiny test model in a Hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Trained test models and the parsed corpus are kept between runs here (not in git).
CACHE = Path(os.environ.get("QF_HOME", ROOT / ".quantfoundry"))
os.environ.setdefault("QF_HOME", str(CACHE))
# The Hub is unreachable: everything loads from the local cache (set before any HF import).
os.environ.setdefault("HF_HOME", str(CACHE / "hf"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A Hub cache for this run holding the tiny test model (trained once, kept in CACHE)."""
    from tests.support import tiny_model

    cache = tmp_path_factory.mktemp("hf") / "hub"
    tiny_model.install(cache, CACHE / "test-models")
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(hub_cache) -> Path:
    from tests.support import tiny_model

    repo = hub_cache / ("models--" + tiny_model.REPO_ID.replace("/", "--"))
    return repo / "snapshots" / (repo / "refs" / "main").read_text()
