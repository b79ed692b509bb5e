"""Token tensors for calibration and evaluation, from a named text source: the built-in
Wikipedia excerpt, a Hub dataset, or a local file."""

from __future__ import annotations

import torch

from quantcore.data import files, hub_datasets, wiki_excerpt
from quantcore.errors import BadRequestError

BUILTIN = "wiki-excerpt"
FILE = "file"
DATASETS = (BUILTIN, FILE, *hub_datasets.HUB_DATASETS)


def check_source(dataset: str, path: str | None, n_samples: int, seq_len: int) -> None:
    """Cheap checks of a calibration source, before anything is loaded."""
    if dataset not in DATASETS:
        raise BadRequestError(
            f"unknown calibration dataset {dataset!r}; available: {', '.join(DATASETS)}"
        )
    if n_samples < 1:
        raise BadRequestError(f"calibration n_samples must be at least 1, got {n_samples}")
    if seq_len < 2:
        raise BadRequestError(f"calibration seq_len must be at least 2, got {seq_len}")
    if dataset == FILE:
        files.check_file(path)


def _documents(dataset: str, split: str, path: str | None, text_field: str) -> list[str]:
    if dataset == BUILTIN:
        arts = (
            wiki_excerpt.calibration_articles()
            if split == "calibration"
            else wiki_excerpt.evaluation_articles()
        )
        return [a.text for a in arts]
    if dataset == FILE:
        if split != "calibration":
            raise BadRequestError("a calibration file cannot be the evaluation text")
        return files.read_documents(path, text_field)
    if dataset in hub_datasets.HUB_DATASETS:
        return hub_datasets.load_documents(dataset, split)
    raise BadRequestError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """The documents' tokens, each document tokenized alone, a blank line's tokens between
    them. One document at a time: tokenizing the joined text as one string holds the
    tokenizer's per-token records for all of it at once (about 300 MB of peak memory for the
    2 MB built-in excerpt, much of it kept by the allocator afterwards)."""
    sep = _tokenize(tokenizer, "\n\n")
    parts: list[torch.Tensor] = []
    for start in range(0, len(docs), 64):  # a few at a time: one call per paragraph is slow
        chunk = docs[start : start + 64]
        ids = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for one in ids:
            if parts:
                parts.append(sep)
            parts.append(torch.tensor(one, dtype=torch.long))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _enough_text(docs: list[str], n_samples: int, seq_len: int, seed: int) -> list[str]:
    """For large sources (Hub datasets): documents in a seeded order, as many as give about
    four times the characters the samples need (~4 characters a token), so a 300k-document
    shard is not tokenized whole."""
    want = 16 * n_samples * seq_len
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    picked, size = [], 0
    for i in order:
        picked.append(docs[i])
        size += len(docs[i])
        if size >= want:
            break
    return picked


def calibration_samples(
    tokenizer,
    dataset: str,
    n_samples: int,
    seq_len: int,
    seed: int,
    *,
    path: str | None = None,
    text_field: str = "text",
) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at seeded random offsets in the calibration
    text (documents separated by blank lines); the same seed gives the same windows."""
    check_source(dataset, path, n_samples, seq_len)
    docs = _documents(dataset, "calibration", path, text_field)
    if dataset in hub_datasets.HUB_DATASETS:
        docs = _enough_text(docs, n_samples, seq_len, seed)
    tokens = _token_stream(tokenizer, docs)
    if tokens.numel() <= seq_len:
        where = f"calibration file {path}" if dataset == FILE else f"calibration text ({dataset})"
        raise BadRequestError(
            f"{where} has {tokens.numel()} tokens; seq_len={seq_len} needs more than "
            f"{seq_len}: add text or lower seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def evaluation_tokens(tokenizer, dataset: str = BUILTIN) -> torch.Tensor:
    """Held-out text joined by blank lines and tokenized once (GPTQ-paper protocol), [1, T]."""
    docs = _documents(dataset, "evaluation", None, "text")
    return _tokenize(tokenizer, "\n\n".join(docs)).unsqueeze(0)
