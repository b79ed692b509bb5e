"""Load a causal LM (whole, or as a lazy skeleton) and find its decoder blocks generically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantcore.errors import ModelNotFoundError, UnsupportedModelError
from quantcore.models.hub import resolve_snapshot

# The families the service is tested on; another one is imported when its first job loads.
WARM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


def warm_imports() -> None:
    """Import what loading a model imports (transformers' auto classes, the tokenizers
    backend, accelerate, the modeling code of the common families): several seconds that a
    job would otherwise spend before its first step. A worker calls this once, before
    forking its job processes. It runs no tensor operation."""
    import importlib

    import accelerate  # noqa: F401
    import transformers

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast"):
        getattr(transformers, name)
    for family in WARM_FAMILIES:
        for part in ("configuration", "modeling"):
            try:
                importlib.import_module(f"transformers.models.{family}.{part}_{family}")
            except ImportError:  # an older or newer transformers without it
                pass


def load_tokenizer(snapshot: Path, model_id: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(snapshot)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{model_id}: no usable tokenizer in {snapshot}: {e}") from e


def load_causal_lm(
    model_id: str, revision: str = "main", dtype: torch.dtype | str = "auto"
) -> tuple[nn.Module, object, Path]:
    """(model on CPU in eval mode, tokenizer, snapshot dir) for a Hub id, local directory or
    GGUF file. The whole model is in memory: for quantizing, `load_lazy` holds one block."""
    from transformers import AutoModelForCausalLM

    snapshot = resolve_snapshot(model_id, revision)
    tokenizer = load_tokenizer(snapshot, model_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype)
    except ValueError as e:
        raise UnsupportedModelError(f"{model_id}: transformers cannot load it: {e}") from e
    model.eval()
    return model, tokenizer, snapshot


def load_lazy(
    model_id: str,
    revision: str = "main",
    dtype: torch.dtype | str = "auto",
    on_convert: Callable[[str], None] | None = None,
):
    """(LazyModel, tokenizer, snapshot dir): the model's skeleton with no weights in memory;
    the walker reads them block by block from the snapshot."""
    from quantcore.models.lazy import LazyModel

    snapshot = resolve_snapshot(model_id, revision, on_convert)
    tokenizer = load_tokenizer(snapshot, model_id)
    lazy = LazyModel(snapshot, dtype)
    decoder_layers(lazy.model)  # an unsupported structure fails now, before calibration
    return lazy, tokenizer, snapshot


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the largest list of identical-class blocks.

    A generic rule instead of a table per architecture: every decoder-only model in
    transformers keeps its blocks in one ModuleList that holds most of the parameters outside
    the embeddings. Two such lists (an encoder's and a decoder's) mean a model the walker
    cannot run block by block from one captured input.
    """
    lists: list[tuple[int, str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if any(name.startswith(other + ".") for _, other, _ in lists):
            continue  # a list inside a block (experts, say), not a list of blocks
        lists.append((sum(p.numel() for p in mod.parameters()), name, mod))
    # Embeddings are left out of the total: a shallow model with a large vocabulary keeps
    # most of its parameters there.
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, getter, lambda: None)()
        if isinstance(mod, nn.Module):
            embeddings.update(id(p) for p in mod.parameters())
    total = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    big = sorted((x for x in lists if x[0] >= 0.3 * total), key=lambda x: -x[0])
    kind = type(model).__name__
    if not big:
        found = ", ".join(f"{n} ({c} params)" for c, n, _ in lists) or "no ModuleList at all"
        raise UnsupportedModelError(
            f"{kind}: found no ModuleList of decoder blocks holding most of the parameters "
            f"(lists: {found}); only decoder-only models with one list of blocks are supported"
        )
    if len(big) > 1:
        names = ", ".join(n for _, n, _ in big)
        raise UnsupportedModelError(
            f"{kind}: found several lists of blocks ({names}), as in an encoder-decoder "
            "model; only decoder-only models with one list of blocks are supported"
        )
    return big[0][1], big[0][2]


def linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of one block, in registration (= execution) order."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
