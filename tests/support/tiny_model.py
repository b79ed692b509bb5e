"""A tiny Llama made by the tests: a byte-level BPE tokenizer trained on the calibration
articles, and a 2-layer model trained for a few seconds on them so that its perplexity is far
from uniform and quantization noise measurably hurts it. Installed in a Hub cache by id."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from quantcore.data import wiki_excerpt
from quantcore.models.hub_cache import install_snapshot

REPO_ID = "quantfoundry-tests/tiny-llama"
VERSION = "v2"  # bump when the recipe below changes


def _train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build(out_dir: Path, steps: int = 400, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    texts = [a.text for a in wiki_excerpt.calibration_articles()]
    tokenizer = _train_tokenizer(texts, vocab=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer("\n\n".join(texts))["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 128, 16
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def install(cache_dir: Path, build_cache: Path) -> Path:
    """Install the tiny model into the Hub cache `cache_dir`; the trained files are kept in
    `build_cache` so later runs skip training."""
    src = build_cache / f"tiny-llama-{VERSION}"
    if not (src / "config.json").exists():
        build_cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=build_cache) as tmp:
            build(Path(tmp))
            Path(tmp).rename(src)
            Path(tmp).mkdir()  # TemporaryDirectory removes it on exit
    return install_snapshot(src, REPO_ID, cache_dir)
