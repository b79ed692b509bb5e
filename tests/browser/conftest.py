"""The browser tier: Debian's headless Chromium, driven by Playwright, against the service as
processes (API, dispatcher, one Celery worker; the embedded backend) with the tiny model.

One stack and one browser per module keep it quick. Chromium missing is a failure with the
command that installs it, never a skip."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CACHE
from tests.support.stack import Stack, base_env

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get update && apt-get install -y chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, hub_cache) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("browser-stack")
    # The parsed calibration corpus from this run's cache: the worker need not parse it again.
    corpus = CACHE / "corpus"
    if corpus.is_dir():
        shutil.copytree(corpus, root / "home" / "corpus")
    env = base_env(root / "home", hub_cache)
    s = Stack(env=env, logs=root / "logs")
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def api(stack) -> Iterator[httpx.Client]:
    """The REST API as a team member with submit and read (for setting up and checking)."""
    token = stack.make_token("ml", "submit,read", "setup")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Screenshots of the run, to look at."""
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser(tmp_path_factory, stack) -> Iterator:
    """A fresh Chromium profile; closed before the stack stops, so no stream is left open."""
    if not shutil.which(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium. Run: {INSTALL}"
        )
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
            base_url=stack.url,
        )
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()
