"""Kernel tests run the Triton kernels on the GPU when there is one, else in Triton's
interpreter on the CPU. The interpreter is chosen here, at import time, before any test module
imports triton (triton reads the variable when a kernel is defined)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
