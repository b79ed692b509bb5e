"""The artifact writer on the tiny trained Llama: streamed shards with an index, replaced
tensors, the manifest, mixed precision, GPTQ read back bit-exactly, tied embeddings, and
the model card."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quantcore.artifact import (
    load_dequantized,
    load_quantized,
    read_quantized,
    read_tensors,
    write_artifact,
    write_model_card,
)
from quantcore.methods.rtn import quantize_rtn

X = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def rtn_all(snapshot: Path, scheme_for) -> dict:
    """RTN of every decoder Linear; `scheme_for(name)` -> (bits, group, sym) or None."""
    out = {}
    for key, w in load_file(snapshot / "model.safetensors").items():
        name = key.removesuffix(".weight")
        if key.startswith("model.layers.") and key.endswith("_proj.weight"):
            scheme = scheme_for(name)
            if scheme is not None:
                out[name] = quantize_rtn(w, *scheme)
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def test_streamed_shards_index_replaced_tensors_and_manifest(tiny_model_dir, tmp_path):
    q = rtn_all(tiny_model_dir, lambda n: (4, 32, False))
    norm = load_file(tiny_model_dir / "model.safetensors")["model.norm.weight"]
    replaced = {"model.norm.weight": norm * 2}
    out = tmp_path / "art"
    seen = []
    info = write_artifact(
        out,
        tiny_model_dir,
        q,
        replaced,
        ignore=["lm_head"],
        recipe={"quantfoundry": {"method": "rtn"}},
        on_progress=lambda d, n, m: seen.append((d, n)),
        max_shard_bytes=64 * 1024,
    )
    assert not out.with_name("art.partial").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-")
    # Every tensor that was neither quantized nor replaced is the snapshot's, byte for byte.
    base = load_file(tiny_model_dir / "model.safetensors")
    art = read_tensors(out)
    assert set(index["weight_map"]) == set(art)
    for key, t in base.items():
        name = key.removesuffix(".weight")
        if name in q:
            assert key not in art and f"{name}.weight_packed" in art
        elif key in replaced:
            assert torch.equal(art[key], replaced[key])
        else:
            assert torch.equal(art[key], t), key
    # The manifest names every other file with its size and sha256.
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"tokenizer.json", "generation_config.json", "recipe.json", "config.json"} <= on_disk
    assert "README.md" not in on_disk  # no card asked for
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert info.total_bytes == sum(e["size"] for e in manifest["files"].values())
    assert seen[-1][0] == seen[-1][1]  # progress reached the end
    # Our kernels over the packed bytes equal the dequantized oracle.
    torch.testing.assert_close(
        logits(load_quantized(out, "reference")), logits(load_dequantized(out))
    )
    # A rewrite replaces an artifact; anything else is not overwritten.
    write_artifact(out, tiny_model_dir, q, {}, ignore=[], recipe={})
    assert "model.safetensors" in {p.name for p in out.iterdir()}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an artifact"):
        write_artifact(tmp_path / "other", tiny_model_dir, q, {}, ignore=[], recipe={})


def test_mixed_precision_loads_in_transformers(tiny_model_dir, tmp_path):
    # Symmetric, so that transformers' compressed mode applies each module's own group
    # (its dequantize-on-load mode applies the first group to every dense module, and
    # compressed-tensors 0.20's compressed mode rejects packed asymmetric zero points).
    def scheme(name):
        if name.endswith("down_proj"):
            return (8, -1, True)
        if name.endswith("v_proj"):
            return None  # skipped: stays in floating point
        return (4, 32, True)

    q = rtn_all(tiny_model_dir, scheme)
    out = tmp_path / "mixed"
    write_artifact(out, tiny_model_dir, q, {}, ignore=["lm_head"], recipe={})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = list(qc["config_groups"].values())
    assert len(groups) == 2
    down = [n for n in q if n.endswith("down_proj")]
    assert sorted(down) in [g["targets"] for g in groups]
    assert "lm_head" in qc["ignore"] and "model.layers.0.self_attn.v_proj" in qc["ignore"]
    ours = logits(load_quantized(out, "reference"))
    theirs = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-5, atol=1e-5)
    back = read_quantized(out)
    assert {n: w.bits for n, w in back.items()} == {n: w.bits for n, w in q.items()}


def test_gptq_artifact_reads_back_bit_exact(tiny_model_dir, tmp_path):
    q = rtn_all(tiny_model_dir, lambda n: (8, -1, True) if "down" in n else (4, 32, False))
    out = tmp_path / "gptq"
    write_artifact(out, tiny_model_dir, q, {}, fmt="gptq", ignore=["lm_head"], recipe={})
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
    tensors = read_tensors(out)
    assert tensors["model.layers.0.mlp.up_proj.qweight"].shape == (64 * 4 // 32, 128)
    back = read_quantized(out)
    assert set(back) == set(q)
    for name, qw in q.items():
        b = back[name]
        assert torch.equal(b.codes, qw.codes) and torch.equal(b.scales, qw.scales)
        assert torch.equal(b.zeros, qw.zeros) and b.g_idx is None
        assert (b.bits, b.group_size, b.symmetric) == (qw.bits, qw.group_size, qw.symmetric)
    pq = tmp_path / "pq"
    write_artifact(pq, tiny_model_dir, q, {}, ignore=["lm_head"], recipe={})
    torch.testing.assert_close(
        logits(load_quantized(out, "reference")), logits(load_quantized(pq, "reference"))
    )


def _tied_snapshot(tiny_model_dir: Path, dst: Path) -> Path:
    """The tiny model as a tied-embeddings checkpoint stores it: no lm_head.weight."""
    shutil.copytree(tiny_model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(tiny_model_dir / "model.safetensors")
    del tensors["lm_head.weight"]
    (dst / "model.safetensors").unlink()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_tied_embeddings(tiny_model_dir, tmp_path):
    snap = _tied_snapshot(tiny_model_dir, tmp_path / "tied")
    q = rtn_all(snap, lambda n: (4, 32, True))
    out = tmp_path / "a"
    write_artifact(out, snap, q, {}, ignore=["lm_head"], recipe={})
    assert "lm_head.weight" not in read_tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = load_quantized(out, "reference")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Quantizing the tied lm_head unties it: embeddings stay float, the head is packed.
    emb = load_file(snap / "model.safetensors")["model.embed_tokens.weight"]
    q["lm_head"] = quantize_rtn(emb, 8, -1, True)
    out2 = tmp_path / "b"
    write_artifact(out2, snap, q, {}, ignore=[], recipe={})
    t = read_tensors(out2)
    assert "lm_head.weight_packed" in t and torch.equal(t["model.embed_tokens.weight"], emb)
    assert json.loads((out2 / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(
        logits(load_quantized(out2, "reference")), logits(load_dequantized(out2))
    )


def test_model_card_carries_license_and_figures(tiny_model_dir, tmp_path):
    snap = tmp_path / "snap"
    shutil.copytree(tiny_model_dir, snap)
    (snap / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- base-tag\n---\n# Tiny\n"
    )
    q = rtn_all(snap, lambda n: (4, 32, False))
    out = tmp_path / "art"
    spec = {
        "model_id": "quantfoundry-tests/tiny-llama",
        "method": "rtn",
        "bits": 4,
        "group_size": 32,
        "symmetric": False,
        "labels": {"team": "x"},
    }
    write_artifact(out, snap, q, {}, ignore=[], recipe={}, card={"spec": spec})
    text = (out / "README.md").read_text()
    assert "README.md" in json.loads((out / "manifest.json").read_text())["files"]
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "quantfoundry-tests/tiny-llama"
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert {"quantfoundry", "compressed-tensors", "4-bit", "rtn"} <= set(meta["tags"])
    assert "## Verification" not in text and '"team": "x"' in text
    results = {
        "ppl_base": 10.0,
        "ppl_quant": 10.5,
        "ppl_change_pct": 5.0,
        "kl": 0.01,
        "top1": 0.93,
        "size_bytes": 12345,
    }
    info = write_model_card(out, snap, {"spec": spec, "results": results})
    text = (out / "README.md").read_text()
    assert (
        "| perplexity change | +5.00% |" in text
        and "| top-1 agreement with base | 0.9300 |" in text
    )
    assert info.files["README.md"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
