"""One llm-compressor configuration for bench/quality.py, run by the Python of a separate venv
that has `llmcompressor` (it pins its own transformers). Imports nothing from this project:
it reads the calibration and evaluation tokens bench/quality.py saved, so both sides see the
same tokens, and measures with the same protocol (non-overlapping windows, mean token NLL;
KL(base || quant) and top-1 agreement per position).

    python -P bench/llmc_child.py SNAPSHOT TOKENS.pt CONFIG WINDOWS SEQ_LEN

(`-P`: the script's directory must not come first on sys.path, where a module of bench/ could
shadow a package that llm-compressor or transformers imports.)
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F


def _scheme(bits: int, group: int, sym: bool) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": sym}
    if group == -1:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=group)
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def _recipe(method: str, bits: int, group: int, sym: bool):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = _scheme(bits, group, sym)
    if method == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if method == "gptq":
        return [
            GPTQModifier(
                config_groups=groups,
                ignore=["lm_head"],
                block_size=128,
                dampening_frac=0.01,
                actorder="static",
            )
        ]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(n_grid=20), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


@torch.no_grad()
def _measure(base, quant, tokens: torch.Tensor, seq_len: int, windows: int) -> dict:
    n = min(windows, tokens.shape[1] // seq_len)
    nll_b = nll_q = kl = 0.0
    agree = positions = 0
    for i in range(n):
        w = tokens[:, i * seq_len : (i + 1) * seq_len]
        a = base(input_ids=w).logits[0].float()
        b = quant(input_ids=w).logits[0].float()
        target = w[0, 1:]
        nll_b += float(F.cross_entropy(a[:-1], target, reduction="sum"))
        nll_q += float(F.cross_entropy(b[:-1], target, reduction="sum"))
        la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
        kl += float((la.exp() * (la - lb)).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += a.shape[0]
    predicted = n * (seq_len - 1)
    return {
        "ppl_base": math.exp(nll_b / predicted),
        "ppl_quant": math.exp(nll_q / predicted),
        "kl": kl / positions,
        "top1": agree / positions,
    }


def main() -> None:
    snapshot, tokens_file, config, windows, seq_len = sys.argv[1:6]
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    schemes = {"w4g64a": (4, 64, False), "w4g64s": (4, 64, True), "w3g64a": (3, 64, False)}
    schemes["w8pcs"] = (8, -1, True)
    method, scheme = config.split("-", 1)
    method = "gptq" if method.startswith("gptq") else method  # their GPTQ has one form
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations for GPU copies, which raises
        # "Cannot access accelerator device" on a machine without one. Pinning only speeds
        # up host-to-device copies, so without a device a tensor stands for its pinned self.
        torch.Tensor.pin_memory = lambda self, *_a, **_k: self
    bits, group, sym = schemes[scheme]
    data = torch.load(tokens_file)
    cal, ev = data["calibration"], data["evaluation"]
    ds = Dataset.from_dict(
        {"input_ids": cal.tolist(), "attention_mask": torch.ones_like(cal).tolist()}
    )
    quant = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    oneshot(
        model=quant,
        dataset=ds,
        recipe=_recipe(method, bits, group, sym),
        max_seq_length=cal.shape[1],
        num_calibration_samples=cal.shape[0],
    )
    seconds = time.perf_counter() - t0
    # Peak memory of loading and quantizing, read before the base model joins for evaluation.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    quant.eval()
    m = _measure(base, quant, ev, int(seq_len), int(windows))
    m.update(
        config=config,
        change_pct=100 * (m["ppl_quant"] / m["ppl_base"] - 1),
        quantize_s=seconds,
        peak_rss_mb=rss,
    )
    print(json.dumps(m))


if __name__ == "__main__":
    main()
