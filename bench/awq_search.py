"""How a strided AWQ scale search compares with trying every exponent, on SmolLM2.

    python -m bench.awq_search [--strides 2,3,4,5] [--save PATH]

Runs the product's default GPTQ (AWQ scales, then GPTQ; w4 g64 asym, 8x512 calibration tokens,
wiki-excerpt seed 0) with an exhaustive scale search (stride 1, grid 20) and keeps every
group's loss curve. For each stride it then replays the search rule (awq.strided_argmin) on those
curves: how often it lands on the exhaustive choice, how many exponents it tries, and how much
higher the loss is when it does not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import report


def main() -> None:
    from huggingface_hub import constants

    from quantcore.data.datasets import calibration_samples
    from quantcore.methods import awq_method
    from quantcore.methods.awq import strided_argmin
    from quantcore.methods.base import QuantScheme, SchemeMap
    from quantcore.methods.gptq_method import GPTQ
    from quantcore.models import smollm2
    from quantcore.models.loading import load_causal_lm
    from quantcore.walker import quantize_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strides", default="2,3,4,5")
    ap.add_argument("--save", type=Path, default=None)
    a = ap.parse_args()

    curves: list[tuple[str, tuple[float, ...]]] = []
    scale_block = awq_method.AWQ.scale_block

    def recording(self, *args, **kwargs):
        self.search_stride = 1  # exhaustive: the full curve of every group
        out = scale_block(self, *args, **kwargs)
        curves.extend((",".join(g.members), g.losses) for g in out[0] if g.losses)
        return out

    awq_method.AWQ.scale_block = recording
    smollm2.prepare(Path(constants.HF_HUB_CACHE))
    model, tok, _ = load_causal_lm(smollm2.REPO_ID)
    cal = calibration_samples(tok, "wiki-excerpt", 8, 512, seed=0)
    quantize_model(model, cal, GPTQ(), SchemeMap(QuantScheme(4, 64, symmetric=False)))

    lines = [
        f"AWQ scale search inside default GPTQ, SmolLM2-135M-Instruct w4 g64 asym, 8x512 "
        f"calibration tokens: {len(curves)} searches over a grid of 20 exponents",
        f"command: python -m bench.awq_search --strides {a.strides}",
        "",
        f"{'stride':>6} {'same choice':>12} {'tries (mean)':>13} {'mean loss excess':>17} "
        f"{'worst loss excess':>18}",
    ]
    for stride in (int(s) for s in a.strides.split(",")):
        same, tries, worst, total = 0, 0, 0.0, 0.0
        for _, losses in curves:
            best = min(range(len(losses)), key=lambda i: (losses[i], i))
            picked, tried = strided_argmin(len(losses), losses.__getitem__, stride)
            tries += len(tried)
            same += picked == best
            excess = losses[picked] / losses[best] - 1
            worst, total = max(worst, excess), total + excess
        lines.append(
            f"{stride:>6} {f'{same}/{len(curves)}':>12} {tries / len(curves):>13.1f} "
            f"{100 * total / len(curves):>16.2f}% {100 * worst:>17.2f}%"
        )
    print("\n".join(lines))
    report.save(lines, a.save)


if __name__ == "__main__":
    main()
