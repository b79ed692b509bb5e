"""GPTQ's damping against held-out text, one layer at a time: which damping makes the codes
GPTQ picks on the calibration tokens best for other text.

    python -m bench.damping [--samples 8,32] [--layers 3,12,25] [--seed 0] [--descent]
        [--save PATH]

For every Linear of the chosen decoder layers of SmolLM2-135M-Instruct (float model, float
inputs) it collects two Hessians: H_cal from `--samples` x 512 calibration tokens and H_eval
from the 16 x 512 held-out evaluation tokens (other articles). GPTQ (act-order, MSE ranges,
scale refit: the product's settings without the AWQ scales) quantizes each weight on H_cal
under each damping rule, and the table gives the loss sum (w - q)^T H (w - q) of those codes
on both Hessians, as the mean over Linears of its ratio to damping 0.01's. A rule that lowers
the calibration loss but not the held-out one fits the calibration text's own directions.
`--descent` adds coordinate descent (gptq.descend_codes) after GPTQ for each rule.
w4 g64 asymmetric (g32 would be lossless on these dequantized Q4_1 weights).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from bench import report

FIXED = (0.01, 0.03, 0.1, 0.2)
PER_FEATURE = (0.35, 0.7, 1.4)


def hessians(model, layers: list[int], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """2/n sum x x^T of each Linear's inputs in `layers` over `tokens` [batch, seq]."""
    from quantcore.methods.gptq import accumulate_hessian

    found: dict[str, tuple[torch.Tensor, int]] = {}
    handles = []
    for i in layers:
        for name, mod in model.model.layers[i].named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue

            def hook(_mod, args, key=f"{i}.{name}"):
                x = args[0]
                h, n = found.get(key, (torch.zeros(x.shape[-1], x.shape[-1]), 0))
                found[key] = accumulate_hessian(h, n, x)

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in tokens.split(4):
            model(batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {k: h for k, (h, _) in found.items()}


def main() -> None:
    from huggingface_hub import constants

    from quantcore.data.datasets import calibration_samples, evaluation_tokens
    from quantcore.methods.gptq import GPTQConfig, data_damp, gptq_quantize, row_errors
    from quantcore.models import smollm2
    from quantcore.models.loading import load_causal_lm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="8,32")
    ap.add_argument("--layers", default="3,12,25")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--descent", action="store_true")
    ap.add_argument("--save", type=Path)
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]

    smollm2.prepare(Path(constants.HF_HUB_CACHE))
    model, tok, _ = load_causal_lm(smollm2.REPO_ID)
    held_out = evaluation_tokens(tok).reshape(-1)[: 16 * 512].reshape(16, 512)
    h_eval = hessians(model, layers, held_out)
    cfg = GPTQConfig(4, 64, False, act_order=True, mse=True, refit=True)
    lines = [
        f"SmolLM2-135M-Instruct layers {a.layers}, w4 g64 asym, GPTQ act-order + MSE + refit;",
        "loss of the codes on the calibration / held-out Hessian, mean over Linears of the",
        "ratio to damp 0.01 (lower is better)",
    ]
    for samples in (int(x) for x in a.samples.split(",")):
        cal = calibration_samples(tok, "wiki-excerpt", samples, 512, seed=a.seed)
        h_cal = hessians(model, layers, cal)
        tokens = samples * 512
        rules = {f"damp {d}": (lambda _w, d=d: d) for d in FIXED}
        for c in PER_FEATURE:
            rules[f"per feature {c}"] = lambda w, c=c, n=tokens: data_damp(0.01, c, w.shape[1], n)
        passes = (0, 1) if a.descent else (0,)
        ratios: dict[str, list[tuple[float, float]]] = {}
        for name, h in h_cal.items():
            w = model.get_submodule(f"model.layers.{name}").weight.data
            base = None
            for rule, damp_of in rules.items():
                for p in passes:
                    qw, _ = gptq_quantize(w, h, replace(cfg, damp=damp_of(w), descent_passes=p))
                    loss = (
                        float(row_errors(w, h, qw).sum()),
                        float(row_errors(w, h_eval[name], qw).sum()),
                    )
                    base = base or loss
                    key = rule + (" + descent 1" if p else "")
                    ratios.setdefault(key, []).append((loss[0] / base[0], loss[1] / base[1]))
        lines.append(f"calibration {samples}x512 tokens (seed {a.seed}), {len(h_cal)} Linears")
        lines.append(f"  {'rule':28s} {'calibration':>11s} {'held-out':>9s}")
        for key, rs in ratios.items():
            cal_r = sum(r[0] for r in rs) / len(rs)
            eval_r = sum(r[1] for r in rs) / len(rs)
            lines.append(f"  {key:28s} {cal_r:11.4f} {eval_r:9.4f}")
        print("\n".join(lines[-len(ratios) - 2 :]), flush=True)
    report.save(lines, a.save)


if __name__ == "__main__":
    main()
