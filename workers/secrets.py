"""Secrets by name: a job names a secret (e.g. its Hub token), the worker resolves it here.
The value never leaves this process: not in logs, job rows, events or messages."""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_SECRETS_DIR = "/run/secrets"


class SecretNotFoundError(LookupError):
    """A named secret is not configured on this worker (the message names it, never a value)."""


def env_name(name: str) -> str:
    """`QF_SECRET_` + the name upper-cased, every character outside [A-Z0-9] as `_`."""
    return "QF_SECRET_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def secrets_dir() -> Path:
    return Path(os.environ.get("QF_SECRETS_DIR") or DEFAULT_SECRETS_DIR)


def resolve_secret(name: str) -> str:
    """The value of secret `name`: the environment variable `env_name(name)`, else the file
    `<QF_SECRETS_DIR>/<name>` (default /run/secrets, where Kubernetes and Compose mount
    them), stripped of surrounding whitespace."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SecretNotFoundError(f"{name!r} is not a valid secret name")
    value = os.environ.get(env_name(name), "").strip()
    if value:
        return value
    path = secrets_dir() / name
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    except OSError as e:
        raise SecretNotFoundError(f"secret {name!r}: cannot read {path}: {e.strerror}") from None
    if not value:
        raise SecretNotFoundError(
            f"secret {name!r} is not configured on this worker: set the environment variable "
            f"{env_name(name)} or create the file {path}"
        )
    return value
