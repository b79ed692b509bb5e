"""Model families found generically: tiny random Llama, Mistral, Qwen2, Qwen3, Gemma2 and
Gemma3 (text) models, saved as safetensors with the tiny test tokenizer, go through the lazy
walker with RTN, GPTQ and AWQ. The lazy walk (a weightless skeleton, blocks read from the
shards) must give exactly what walking the whole model in memory gives, and the model rebuilt
from its output must stay close to the float model."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantcore.data.datasets import calibration_samples
from quantcore.errors import UnsupportedModelError
from quantcore.methods.awq_method import AWQ
from quantcore.methods.base import QuantScheme, SchemeMap
from quantcore.methods.gptq_method import GPTQ
from quantcore.methods.rtn_method import RTN
from quantcore.models.lazy import LazyModel
from quantcore.models.loading import decoder_layers
from quantcore.walker import walk

SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


def _configs(vocab: int) -> dict:
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(SHAPE, vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=False),
        "mistral": MistralConfig(**common, sliding_window=None),
        # Qwen2 has biases on q/k/v; Qwen3 has per-head q/k norms; both tie embeddings here.
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**common, tie_word_embeddings=True),
        # Gemma: norms scale by (1 + weight), sandwich norms, scaled embeddings, tied head.
        "gemma2": Gemma2Config(**common),
        "gemma3": Gemma3TextConfig(**common, sliding_window=16),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_model_dir, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, config in _configs(len(tokenizer)).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # norms away from their init, so a wrong fold shows
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / name)
        for f in tiny_model_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, root / name / f.name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def samples(tokenizer):
    return calibration_samples(tokenizer, "wiki-excerpt", 4, 32, seed=0)


# GPTQ with its default AWQ scales (a coarse grid): the folds into each family's norms too.
METHODS = {"rtn": RTN, "gptq": lambda: GPTQ(awq_grid=5), "awq": lambda: AWQ(grid=5, clip_grid=5)}


@torch.no_grad()
def _rebuilt(model_dir: Path, quantized, replaced) -> torch.nn.Module:
    """The float model with every quantized weight replaced by its dequantized value and
    every changed float put in: what the artifact stands for."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    params = dict(model.named_parameters())
    for name, qw in quantized.items():
        w = params[f"{name}.weight"]
        w.copy_(qw.dequantize(w.dtype))
    for name, t in replaced.items():
        params[name].copy_(t)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_walk_equals_in_memory_walk(family, family_dirs, samples):
    model_dir = family_dirs[family]
    lazy = LazyModel(model_dir)
    prefix, blocks = decoder_layers(lazy.model)
    assert prefix == "model.layers" and len(blocks) == 2
    assert all(p.is_meta for p in lazy.model.parameters())
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = base(input_ids=samples).logits
    scheme = SchemeMap(QuantScheme(8, 16, False))
    for method, make in METHODS.items():
        eager = walk(
            AutoModelForCausalLM.from_pretrained(model_dir).eval(), samples, make(), scheme
        )
        lazy = LazyModel(model_dir)
        result = walk(lazy, samples, make(), scheme)
        assert len(result.quantized) == 14, (family, method)
        assert all(p.is_meta for p in lazy.model.parameters()), "blocks were not released"
        for name, qw in eager.quantized.items():
            got = result.quantized[name]
            assert torch.equal(got.codes, qw.codes), (family, method, name)
            assert torch.equal(got.scales, qw.scales), (family, method, name)
        assert result.replaced.keys() == eager.replaced.keys(), (family, method)
        for name, t in eager.replaced.items():
            assert torch.equal(result.replaced[name], t), (family, method, name)
        if method == "awq":  # AWQ folded its scales into norms: they are handed back
            assert any("layernorm" in n for n in result.replaced), family
        rebuilt = _rebuilt(model_dir, result.quantized, result.replaced)
        with torch.no_grad():
            out = rebuilt(input_ids=samples).logits
        rel = float((out - logits).pow(2).sum() / logits.pow(2).sum())
        assert rel < 1e-3, (family, method, rel)


def test_tied_embeddings_stay_tied_and_load_once(family_dirs):
    lazy = LazyModel(family_dirs["qwen3"])
    model = lazy.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lazy.materialize(model.model.embed_tokens)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta
    lazy.release(model.model.embed_tokens)
    assert model.lm_head.weight.is_meta


def _mapped(path: Path) -> bool:
    """Whether this process maps `path` (Linux's /proc)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_materialized_weights_own_their_memory(family_dirs):
    """safetensors maps a shard privately; a weight left in that mapping would fault each page
    in from the file on its first write (the walk writes every weight). Materialized weights
    are copies: once the block is in, the shard is no longer mapped."""
    lazy = LazyModel(family_dirs["llama"])
    blocks = decoder_layers(lazy.model)[1]
    shards = sorted(family_dirs["llama"].glob("*.safetensors"))
    lazy.materialize(blocks[0])
    gc.collect()
    assert shards and not any(_mapped(f) for f in shards)
    w = blocks[0].mlp.down_proj.weight
    with safe_open(shards[0], framework="pt") as f:
        stored = f.get_tensor(lazy.stored_name(w))
        assert _mapped(shards[0])  # what the check above would see for a mapped weight
    assert torch.equal(w, stored)
    lazy.release(blocks[0])


def test_an_encoder_decoder_is_refused_by_name(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedModelError, match="no causal-LM class for model_type 't5'"):
        LazyModel(tmp_path / "t5")
    with torch.device("meta"):
        t5 = T5ForConditionalGeneration(config)
    with pytest.raises(UnsupportedModelError, match="several lists of blocks") as e:
        decoder_layers(t5)
    assert "encoder.block" in str(e.value) and "decoder.block" in str(e.value)


def test_a_weight_the_snapshot_lacks_is_named(family_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = family_dirs["llama"]
    shutil.copytree(src, tmp_path / "broken")
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    lazy = LazyModel(tmp_path / "broken")
    _, blocks = decoder_layers(lazy.model)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        lazy.materialize(blocks[1])
