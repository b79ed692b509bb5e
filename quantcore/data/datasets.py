"""Token tensors for calibration and evaluation, from a named text source."""

from __future__ import annotations

import torch

from quantcore.data import wiki_excerpt
from quantcore.errors import BadRequestError

BUILTIN = "wiki-excerpt"
DATASETS = (BUILTIN,)


def _texts(dataset: str, split: str) -> list[str]:
    if dataset != BUILTIN:
        raise BadRequestError(f"unknown calibration dataset {dataset!r}; available: {DATASETS}")
    arts = (
        wiki_excerpt.calibration_articles()
        if split == "calibration"
        else wiki_excerpt.evaluation_articles()
    )
    return [a.text for a in arts]


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(
    tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at seeded random offsets in the calibration text."""
    tokens = _tokenize(tokenizer, "\n\n".join(_texts(dataset, "calibration")))
    if tokens.numel() <= seq_len:
        raise BadRequestError(
            f"calibration text has {tokens.numel()} tokens, fewer than seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def evaluation_tokens(tokenizer, dataset: str = BUILTIN) -> torch.Tensor:
    """Held-out text joined by blank lines and tokenized once (GPTQ-paper protocol), [1, T]."""
    return _tokenize(tokenizer, "\n\n".join(_texts(dataset, "evaluation"))).unsqueeze(0)
