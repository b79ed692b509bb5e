"""How GPTQ's MSE range search behaves on SmolLM2: coarse-to-fine rules against trying every
shrink, how far the best shrink goes, and the product's error power (2.5) against 2.4.

    python -m bench.mse_search [--schemes w4g64a,w4g64s,w3g64a,w8pcs] [--rows 4000] [--save PATH]

GPTQ's `mse` option picks, per group, the range shrink 1 - i/80 (i = 0..32) with the lowest
sum |error|^2.5 (gptq._rounding_error). For a sample of `--rows` groups of every decoder Linear
of SmolLM2-135M-Instruct it computes whole error curves over i = 0..64 (the range GPTQ's
reference code searches), then reports:
- the largest best shrink seen (is stopping at i = 32 safe?);
- coarse-to-fine rules (every stride-th shrink of 0..32, then `radius` on either side of the
  best): how often they land on the exhaustive choice, and how much higher the error is when
  they do not;
- how the exhaustive |error|^2.5 choice compares with the |error|^2.4 one (GPTQ's reference
  power, which needs a pow per element): same choice, and its mean |error|^2.4 excess.
Whole-weight groups here; inside default GPTQ the groups are those of the AWQ-scaled weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import report

SCHEMES = {"w4g64a": (4, 64, False), "w4g64s": (4, 64, True), "w3g64a": (3, 64, False)}
SCHEMES["w8pcs"] = (8, -1, True)
RULES = [(2, 1), (4, 2), (4, 3), (6, 3), (8, 7)]
SEARCHED = 33  # shrinks i = 0..32 (max_shrink 0.4 of grid 80), as gptq._mse_params


def curves(
    weights: dict[str, torch.Tensor], bits: int, gs: int, sym: bool, rows: int, power: float
) -> torch.Tensor:
    """[groups, 65] sum |error|^power of each sampled group at shrinks i = 0..64."""
    from quantcore.methods.rtn import range_params, round_trip

    out = []
    gen = torch.Generator().manual_seed(0)
    maxq = (1 << bits) - 1
    for w in weights.values():
        w = w.float() if gs == -1 else w.float().reshape(-1, gs)
        w = w[torch.randperm(w.shape[0], generator=gen)[:rows]]
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        errs = []
        for i in range(65):
            scale, zero = range_params(lo * (1 - i / 80), hi * (1 - i / 80), bits, sym, w.dtype)
            e = round_trip(w, scale[:, None], zero[:, None], maxq).sub_(w)
            errs.append(e.abs_().pow_(power).sum(dim=1))
        out.append(torch.stack(errs, dim=1))
    return torch.cat(out)


def replay(errors: torch.Tensor, stride: int, radius: int) -> tuple[float, float, float, int]:
    """Share of rows with the exhaustive minimum, mean and worst relative excess, tries."""
    n = errors.shape[1]
    coarse = torch.tensor(sorted({*range(0, n, stride), n - 1}))
    best_coarse = coarse[errors[:, coarse].argmin(dim=1)]
    near = (best_coarse[:, None] + torch.arange(-radius, radius + 1)[None]).clamp(0, n - 1)
    tried = torch.cat([coarse.expand(errors.shape[0], -1), near], dim=1)
    found = errors.gather(1, tried).min(dim=1).values
    exact = errors.min(dim=1).values
    excess = found / exact.clamp_min(1e-30) - 1
    same = float((found == exact).float().mean())
    return same, float(excess.mean()), float(excess.max()), len(coarse) + 2 * radius


def main() -> None:
    from huggingface_hub import constants
    from safetensors.torch import load_file

    from quantcore.models import smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--rows", type=int, default=4000, help="groups sampled per weight")
    ap.add_argument("--save", type=Path, default=None)
    a = ap.parse_args()

    snapshot = Path(smollm2.prepare(Path(constants.HF_HUB_CACHE)))
    weights = {}
    for f in sorted(snapshot.glob("*.safetensors")):
        weights.update(
            (k, v) for k, v in load_file(str(f)).items() if v.dim() == 2 and ".layers." in k
        )
    lines = [
        f"MSE range search on SmolLM2-135M-Instruct: {len(weights)} decoder weights, up to "
        f"{a.rows} groups sampled from each",
        f"command: python -m bench.mse_search --schemes {a.schemes} --rows {a.rows}",
        "",
        f"{'scheme':>7} {'stride':>6} {'radius':>6} {'tries':>5} {'same choice':>11} "
        f"{'mean excess':>11} {'worst excess':>12}   (|error|^2.5, shrinks 0..32)",
    ]
    print("\n".join(lines), flush=True)
    powers = []
    for name in a.schemes.split(","):
        errors = curves(weights, *SCHEMES[name], a.rows, 2.5)
        reference = curves(weights, *SCHEMES[name], a.rows, 2.4)
        for stride, radius in RULES:
            same, mean, worst, tries = replay(errors[:, :SEARCHED], stride, radius)
            lines.append(
                f"{name:>7} {stride:>6} {radius:>6} {tries:>5} {same:>11.4f} {mean:>11.2e} "
                f"{worst:>12.3f}"
            )
            print(lines[-1], flush=True)
        best = errors.argmin(dim=1)
        chosen = errors[:, :SEARCHED].argmin(dim=1)
        ref_best = reference[:, :SEARCHED].argmin(dim=1)
        excess = reference.gather(1, chosen[:, None]) / reference.gather(1, ref_best[:, None])
        powers.append(
            f"{name:>7} {int(best.max()):>14} {float((chosen == ref_best).float().mean()):>18.4f} "
            f"{float(excess.mean() - 1):>20.2e}"
        )
    lines += [
        "",
        f"{'scheme':>7} {'largest best i':>14} {'same as power 2.4':>18} "
        f"{'mean 2.4-error excess':>20}",
        *powers,
    ]
    print("\n".join(lines[-len(powers) - 2 :]), flush=True)
    report.save(lines, a.save)


if __name__ == "__main__":
    main()
