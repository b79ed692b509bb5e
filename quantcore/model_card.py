"""The artifact's model card: README.md with YAML front matter (base_model, tags, license
carried from the base model) and the verification figures and exact spec as tables."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# Front-matter keys of the base card carried over unchanged.
CARRIED = ("license", "license_name", "license_link", "language", "pipeline_tag")
FORMAT_TAGS = {"pack-quantized": "compressed-tensors", "gptq": "gptq"}

FIGURES = (
    ("ppl_base", "perplexity, base model", "{:.4f}"),
    ("ppl_quant", "perplexity, quantized", "{:.4f}"),
    ("ppl_change_pct", "perplexity change", "{:+.2f}%"),
    ("kl", "KL divergence from base (nats/token)", "{:.5f}"),
    ("top1", "top-1 agreement with base", "{:.4f}"),
    ("ms_per_token_b1", "decode, batch 1 (ms/token)", "{:.2f}"),
    ("tokens_per_s_b8", "decode, batch 8 (tokens/s)", "{:.1f}"),
    ("size_bytes", "weights on disk (bytes)", "{:,}"),
    ("eval_tokens", "evaluation tokens", "{:,}"),
    ("eval_windows", "evaluation windows", "{}"),
    ("eval_seq_len", "window length (tokens)", "{}"),
)


def base_card_metadata(snapshot: Path) -> dict:
    """The YAML front matter of the base model's README.md (empty when there is none)."""
    readme = snapshot / "README.md"
    if not readme.exists():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def card_metadata(snapshot: Path, card: dict) -> dict:
    """Front matter: base_model, relation, tags, and the base's license when it has one
    (its card first, then a `license` key in its config.json)."""
    base = base_card_metadata(snapshot)
    spec = card.get("spec", {})
    meta: dict = {"base_model": card.get("base_model") or spec.get("model_id")}
    meta["base_model_relation"] = "quantized"
    meta.update({k: base[k] for k in CARRIED if base.get(k)})
    if "license" not in meta:
        config = json.loads((snapshot / "config.json").read_text())
        if config.get("license"):
            meta["license"] = config["license"]
    meta["library_name"] = "transformers"
    tags = ["quantfoundry", "quantized", FORMAT_TAGS.get(card.get("format", ""), "quantized")]
    if spec.get("bits"):
        tags.append(f"{spec['bits']}-bit")
    if spec.get("method"):
        tags.append(str(spec["method"]))
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def _figures_table(results: dict) -> str:
    rows = ["| figure | value |", "| --- | --- |"]
    for key, label, fmt in FIGURES:
        if results.get(key) is not None:
            rows.append(f"| {label} | {fmt.format(results[key])} |")
    return "\n".join(rows)


def render_card(snapshot: Path, card: dict) -> str:
    """README.md for an artifact. `card`: base_model, format, spec (the exact job spec),
    results (verification figures, optional), repo_id (optional)."""
    meta = card_metadata(snapshot, card)
    spec = card.get("spec", {})
    results = card.get("results") or {}
    name = card.get("repo_id") or f"{meta['base_model']} ({spec.get('method', 'quantized')})"
    scheme = (
        f"{spec.get('bits')}-bit, group size {spec.get('group_size')}, "
        f"{'symmetric' if spec.get('symmetric') else 'asymmetric'}"
    )
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False).rstrip() + "\n---",
        f"# {name}",
        f"A {spec.get('method', '').upper()} {scheme} quantization of "
        f"[{meta['base_model']}](https://huggingface.co/{meta['base_model']}), "
        f"stored as `{card.get('format')}`, made with quantfoundry.",
    ]
    if card.get("format") == "pack-quantized":
        parts.append(
            "Loads in transformers (with the `compressed-tensors` package) and vLLM:\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM\n"
            'model = AutoModelForCausalLM.from_pretrained("<this repo>")\n```'
        )
    if results:
        parts.append(
            "## Verification\n\nMeasured on held-out text through quantfoundry's packed-weight "
            "kernels over this repository's bytes; the base model by the same code in the same "
            "run (non-overlapping windows, mean token NLL).\n\n" + _figures_table(results)
        )
    parts.append(
        "## Spec\n\nThe exact job spec:\n\n```json\n"
        + json.dumps(spec, indent=2, sort_keys=True, default=str)
        + "\n```"
    )
    return "\n\n".join(parts) + "\n"
