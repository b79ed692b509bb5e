"""GPTQ's options one at a time on SmolLM2-135M-Instruct (w4 g64 asym), printed as lines.

    python -m bench.gptq_variants [--variants plain,mse,awq,awq+mse] [--bits 4]

Each variant quantizes a copy of the in-memory model with 8 calibration samples of 512 tokens
(wiki-excerpt, seed 0) and is scored by perplexity on 16 held-out windows of 512 tokens, the
protocol of bench/quality.py. `plain` is textbook GPTQ (act-order, static groups); `mse` adds
the per-group range search; `awq` adds AWQ's channel scales before GPTQ; `awq+mse` is the
product's default (its scale search re-runs modules on the first 512 calibration tokens);
`awq+mse-all` searches on all 4096, `awq+mse-2k` on 2048, `awq+mse-1k` on 1024.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from bench import report

VARIANTS = {
    "plain": {"awq_scales": False, "mse": False},
    "mse": {"awq_scales": False, "mse": True},
    "awq": {"awq_scales": True, "mse": False},
    "awq+mse": {"awq_scales": True, "mse": True},
    "awq+mse-all": {"awq_scales": True, "mse": True, "awq_tokens": None},
    "awq+mse-2k": {"awq_scales": True, "mse": True, "awq_tokens": 2048},
    "awq+mse-1k": {"awq_scales": True, "mse": True, "awq_tokens": 1024},
}


def main() -> None:
    from huggingface_hub import constants

    from quantcore.data.datasets import calibration_samples, evaluation_tokens
    from quantcore.eval.perplexity import perplexity
    from quantcore.methods.base import QuantScheme, SchemeMap
    from quantcore.methods.gptq_method import GPTQ
    from quantcore.models import smollm2
    from quantcore.models.loading import load_causal_lm
    from quantcore.walker import quantize_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--save", type=Path, default=None, help="also write the lines here")
    ap.add_argument("--bits", type=int, default=4)
    a = ap.parse_args()
    smollm2.prepare(Path(constants.HF_HUB_CACHE))
    model, tok, _ = load_causal_lm(smollm2.REPO_ID)
    tokens = evaluation_tokens(tok)
    base = perplexity(model, tokens, 512, 16).ppl
    cal = calibration_samples(tok, "wiki-excerpt", 8, 512, seed=0)
    lines = [
        f"GPTQ variants, SmolLM2-135M-Instruct w{a.bits} g64 asym, calibration 8x512 tokens "
        f"(wiki-excerpt, seed 0), evaluation 16x512 held-out tokens; base perplexity {base:.3f}",
        f"command: python -m bench.gptq_variants --variants {a.variants} --bits {a.bits}",
    ]
    for line in lines:
        print(line, flush=True)
    for name in a.variants.split(","):
        q = copy.deepcopy(model)
        t = time.perf_counter()
        scheme = SchemeMap(QuantScheme(a.bits, 64, symmetric=False))
        quantize_model(q, cal, GPTQ(**VARIANTS[name]), scheme)
        dt = time.perf_counter() - t
        p = perplexity(q, tokens, 512, 16).ppl
        lines.append(f"{name:<12} ppl {p:.3f} ({100 * (p / base - 1):+.2f}%), quantize {dt:.0f} s")
        print(lines[-1], flush=True)
    report.save(lines, a.save)


if __name__ == "__main__":
    main()
