"""Quality, time and memory of our methods on SmolLM2-135M-Instruct, printed as a table.

    python -m bench.quality [--configs rtn-w4g64a,gptq-w4g64a,...] [--samples 16] [--windows 16]
        [--seeds 0,1,2] [--llmc-python .quantfoundry/llmc-venv/bin/python]

Each configuration runs in its own process so that its peak RSS is its own. Perplexity uses the
GPTQ-paper protocol on the held-out articles; KL and top-1 agreement are against the base model
on the same windows. SmolLM2's weights are dequantized Q4_1 (g32, float minimum), so group-32
asymmetric RTN would be lossless by construction and is not among the configurations.

With `--llmc-python` (a Python whose venv has `llmcompressor`; by default
`.quantfoundry/llmc-venv/bin/python` when it exists), each configuration also runs through
llm-compressor (bench/llmc_child.py) on the very same calibration and evaluation tokens, and a
second table sets the two side by side.

With several `--seeds`, each configuration runs once per calibration seed (other calibration
windows, the same held-out text), llm-compressor on each seed's very tokens, and a last table
gives the mean and spread over the seeds: one run's perplexity moves by about a point under
rounding noise alone (bench/results/quality-cpu-2core.txt), too much to judge a 0.6x goal by.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean, stdev

SCHEMES = {
    "w4g64a": (4, 64, False),
    "w4g64s": (4, 64, True),
    "w3g64a": (3, 64, False),
    "w8pcs": (8, -1, True),
}
# name -> (job method, method options). `gptq` is the product's default GPTQ (AWQ scales
# first, MSE range search, data-dependent damping); `gptqplain` is textbook GPTQ (damp 0.01),
# for the like-for-like row.
METHODS = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "gptqplain": (
        "gptq",
        {"awq_scales": False, "mse": False, "refit": False, "damp_per_feature": 0.0},
    ),
    "awq": ("awq", {}),
    # Variants of the default: without the scale refit; with error propagation (GPTAQ/QEP).
    "gptqnorefit": ("gptq", {"refit": False}),
    "gptqp25": ("gptq", {"propagate": 0.25}),
    "gptqp50": ("gptq", {"propagate": 0.5}),
    # AWQ's scale search on the first 2048 calibration tokens (four sequences), not 512 (one).
    "gptqawq2k": ("gptq", {"awq_tokens": 2048}),
    # Every Hessian from the float block's recording pass (no true-sequential passes); and
    # columns in their own order with each group's range taken as GPTQ reaches it.
    "gptqnots": ("gptq", {"true_sequential": False}),
    "gptqnoact": ("gptq", {"act_order": False}),
    # Codes and scales alternated: GPTQ again under the re-fitted scales, then a second refit.
    "gptqrr2": ("gptq", {"refit_rounds": 2}),
    # Coordinate descent on the codes after GPTQ (QuantEase), then a refit.
    "gptqcd1": ("gptq", {"descent_passes": 1}),
    # Damping: GPTQ's usual fixed 0.01 (the default before damp_per_feature), a fixed 0.1.
    "gptqd01": ("gptq", {"damp_per_feature": 0.0}),
    "gptqd10": ("gptq", {"damp": 0.1, "damp_per_feature": 0.0}),
    "gptqd10cd1": ("gptq", {"damp": 0.1, "damp_per_feature": 0.0, "descent_passes": 1}),
    "awqd01": ("awq", {"damp_per_feature": 0.0}),
    # Coordinate descent on AWQ's rounded codes against the recorded inputs' Hessian.
    "awqcd1": ("awq", {"descent_passes": 1}),
    "awqcd2": ("awq", {"descent_passes": 2}),
    "awqcd3": ("awq", {"descent_passes": 3}),
    "awqcd4": ("awq", {"descent_passes": 4}),
    # Steps after the first (o; gate/up; down) clipped and fitted on the inputs the rounded
    # block gives them; and aimed at the float block's outputs (in-block GPTAQ / QEP).
    "awqts": ("awq", {"true_sequential": True}),
    "awqtsp25": ("awq", {"true_sequential": True, "propagate": 0.25}),
    "awqtsp50": ("awq", {"true_sequential": True, "propagate": 0.5}),
    "awqtsp100": ("awq", {"true_sequential": True, "propagate": 1.0}),
    # o_proj scaled under grouped-query attention too (tied over the heads sharing values).
    "awqsv": ("awq", {"shared_values": True}),
    "awqtsp50sv": ("awq", {"true_sequential": True, "propagate": 0.5, "shared_values": True}),
    "gptqsv": ("gptq", {"awq_shared_values": True}),
    # Aimed at the float model's outputs (its inputs to each block run alongside).
    "awqtsm50": ("awq", {"true_sequential": True, "propagate": 0.5, "propagate_model": True}),
    "awqtsm25": ("awq", {"true_sequential": True, "propagate": 0.25, "propagate_model": True}),
    "awqtsm75": ("awq", {"true_sequential": True, "propagate": 0.75, "propagate_model": True}),
    # The scale search judging each alpha by plain RTN (AWQ's way, the default before
    # session 16), by RTN then a scale refit (the default), and with a code descent too.
    "awqsfrtn": ("awq", {"search_fit": "rtn"}),
    "awqsfr": ("awq", {"search_fit": "refit"}),
    "awqsfd": ("awq", {"search_fit": "descent"}),
    # Duo scaling (AutoAWQ's, llm-compressor's default): s = mean|x|^a / w_mean^(1 - a).
    "awqduo": ("awq", {"duo_scaling": "on"}),
    "awqboth": ("awq", {"duo_scaling": "both"}),
    "gptqduo": ("gptq", {"awq_duo": "on"}),
    "gptqboth": ("gptq", {"awq_duo": "both"}),
    # Calibration forwards in float32 throughout (the default, "auto", runs their matmuls in
    # bfloat16 on a CPU with AVX512-BF16; quantcore.precision). Not a method option: run_one
    # moves it into the calibration settings.
    "gptqf32": ("gptq", {"forward_dtype": "float32"}),
    "awqf32": ("awq", {"forward_dtype": "float32"}),
    # Where the error comes from: one kind of Linear left in floating point (not a method
    # option: run_one adds the patterns to the request's ignore list).
    "awqfloato": ("awq", {"keep_float": (r".*\.o_proj",)}),
    "awqfloatqkv": ("awq", {"keep_float": (r".*\.[qkv]_proj",)}),
    "awqfloatgu": ("awq", {"keep_float": (r".*\.(gate|up)_proj",)}),
    "awqfloatdown": ("awq", {"keep_float": (r".*\.down_proj",)}),
}
DEFAULT = [f"{m}-{s}" for s in SCHEMES for m in ("rtn", "gptq", "awq")]


def run_one(
    config: str,
    samples: int,
    windows: int,
    seq_len: int,
    tokens_out: str | None = None,
    seed: int = 0,
) -> dict:
    """One configuration through the product's own path (`pipeline.quantize`: lazy loading,
    block by block, layers spilled to disk), timed from the request to the quantized weights.
    Peak RSS is read when quantization ends, before the evaluation loads two whole models."""
    import copy

    from huggingface_hub import constants

    from quantcore.data.datasets import calibration_samples, evaluation_tokens
    from quantcore.eval.agreement import agreement
    from quantcore.eval.perplexity import perplexity
    from quantcore.models import smollm2
    from quantcore.models.loading import load_causal_lm, warm_imports
    from quantcore.pipeline import Calibration, QuantizeRequest, quantize
    from quantcore.walker import install

    name, scheme = config.split("-", 1)
    method, options = METHODS[name]
    options = dict(options)
    forward_dtype = options.pop("forward_dtype", "auto")
    keep_float = tuple(options.pop("keep_float", ()))
    bits, group, sym = SCHEMES[scheme]
    smollm2.prepare(Path(constants.HF_HUB_CACHE))
    req = QuantizeRequest(
        model_id=smollm2.REPO_ID,
        method=method,
        bits=bits,
        group_size=group,
        symmetric=sym,
        calibration=Calibration(
            n_samples=samples, seq_len=seq_len, seed=seed, forward_dtype=forward_dtype
        ),
        ignore=("lm_head", *keep_float),
        method_options=options,
    )
    # As in a worker's job process, transformers' model code is already imported (the worker
    # imports it once before forking); llm-compressor's child likewise imports before timing.
    warm_imports()
    t0 = time.perf_counter()
    q = quantize(req, device="cpu")
    seconds = time.perf_counter() - t0
    rss_quantize = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    model, tok, snapshot = load_causal_lm(smollm2.REPO_ID)
    tokens = evaluation_tokens(tok)
    if tokens_out:  # for llm-compressor: the very tokens the pipeline calibrated on
        import torch

        cal = calibration_samples(tok, "wiki-excerpt", samples, seq_len, seed=seed)
        torch.save({"calibration": cal, "evaluation": tokens}, tokens_out)
    base = perplexity(model, tokens, seq_len, windows)
    quant = copy.deepcopy(model)
    install(quant, q.quantized, q.replaced)
    qp = perplexity(quant, tokens, seq_len, windows)
    agr = agreement(model, quant, tokens, seq_len, windows)
    return {
        "snapshot": str(snapshot),
        "config": config,
        "seed": seed,
        "ppl_base": base.ppl,
        "ppl_quant": qp.ppl,
        "change_pct": 100 * (qp.ppl / base.ppl - 1),
        "kl": agr.kl,
        "top1": agr.top1,
        "quantize_s": seconds,
        "peak_rss_mb": rss_quantize,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(DEFAULT))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seeds", default="0", help="calibration seeds, comma-separated")
    default_llmc = Path(".quantfoundry/llmc-venv/bin/python")
    ap.add_argument("--llmc-python", default=str(default_llmc) if default_llmc.exists() else None)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--tokens-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    if a.one:
        row = run_one(a.one, a.samples, a.windows, a.seq_len, a.tokens_out, seeds[0])
        print(json.dumps(row))
        return
    # Converted here, once: in a configuration's process the conversion's memory would be
    # that configuration's peak RSS (the first run on a fresh machine read 1213 MB, not ~715).
    subprocess.run(
        [sys.executable, "-m", "quantfoundry", "prepare-model"], check=True, env=os.environ.copy()
    )
    rows, llmc_rows = [], {}
    tokens_file = Path(tempfile.mkdtemp(prefix="qf-quality-")) / "tokens.pt"
    for config, seed in ((c, s) for c in a.configs.split(",") for s in seeds):
        cmd = [
            sys.executable,
            "-m",
            "bench.quality",
            "--one",
            config,
            "--samples",
            str(a.samples),
            "--windows",
            str(a.windows),
            "--seq-len",
            str(a.seq_len),
            "--tokens-out",
            str(tokens_file),
            "--seeds",
            str(seed),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode != 0:
            print(f"{config} seed {seed}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done {config} seed {seed}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        if a.llmc_python:
            child = Path(__file__).with_name("llmc_child.py")
            # -P: bench/'s modules must not shadow the packages llm-compressor imports.
            cmd = [a.llmc_python, "-P", str(child), rows[-1]["snapshot"], str(tokens_file), config]
            cmd += [str(a.windows), str(a.seq_len)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                print(
                    f"{config} seed {seed} (llm-compressor): failed\n{out.stderr[-3000:]}",
                    file=sys.stderr,
                )
                continue
            llmc_rows[config, seed] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"done {config} seed {seed} (llm-compressor): "
                f"{json.dumps(llmc_rows[config, seed])}",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"SmolLM2-135M-Instruct, calibration {a.samples}x{a.seq_len} tokens, "
        f"evaluation {a.windows}x{a.seq_len} held-out tokens; GPTQ with act-order "
        "(static groups), block 128 (gptq: with AWQ scales, grid 20, and MSE range search, "
        "scales re-fitted on H, damp max(0.01, 0.7 x width / tokens); gptqplain: none of "
        "these, damp 0.01); AWQ grid 20 with clipping and re-fitted scales"
    )
    head = (
        f"{'config':<19}{'seed':>5}{'ppl base':>10}{'ppl quant':>11}{'change':>9}{'KL':>9}"
        f"{'top-1':>8}{'time s':>8}{'RSS MB':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['config']:<19}{r['seed']:>5}{r['ppl_base']:>10.3f}{r['ppl_quant']:>11.3f}"
            f"{r['change_pct']:>+8.2f}%{r['kl']:>9.4f}{r['top1']:>8.3f}"
            f"{r['quantize_s']:>8.1f}{r['peak_rss_mb']:>8.0f}"
        )
    if llmc_rows:
        _side_by_side(rows, llmc_rows)
    if len(seeds) > 1:
        _over_seeds(rows, llmc_rows)


def _side_by_side(rows: list[dict], llmc: dict[tuple[str, int], dict]) -> None:
    """Ours next to llm-compressor's on the same tokens; ratios are ours / theirs (the goals:
    perplexity increase at most 0.6x, time and peak RSS at most 0.7x)."""
    print()
    print("quantfoundry vs llm-compressor (same calibration and evaluation tokens)")
    head = (
        f"{'config':<19}{'seed':>5}{'change ours':>12}{'theirs':>9}{'ratio':>7}{'KL ours':>9}"
        f"{'theirs':>8}{'top-1 ours':>11}{'theirs':>7}{'time ours':>10}{'theirs':>8}"
        f"{'ratio':>7}{'RSS ours':>9}{'theirs':>8}{'ratio':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        t = llmc.get((r["config"], r["seed"]))
        if t is None:
            continue
        print(
            f"{r['config']:<19}{r['seed']:>5}{r['change_pct']:>+11.2f}%{t['change_pct']:>+8.2f}%"
            f"{r['change_pct'] / t['change_pct']:>7.2f}"
            f"{r['kl']:>9.4f}{t['kl']:>8.4f}{r['top1']:>11.3f}{t['top1']:>7.3f}"
            f"{r['quantize_s']:>10.1f}{t['quantize_s']:>8.1f}"
            f"{r['quantize_s'] / t['quantize_s']:>7.2f}"
            f"{r['peak_rss_mb']:>9.0f}{t['peak_rss_mb']:>8.0f}"
            f"{r['peak_rss_mb'] / t['peak_rss_mb']:>7.2f}"
        )


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return fmean(values), stdev(values) if len(values) > 1 else 0.0


def _over_seeds(rows: list[dict], llmc: dict[tuple[str, int], dict]) -> None:
    """Each configuration over its seeds: mean and standard deviation of the perplexity
    change and KL, ours and llm-compressor's, the ratio of the mean changes and the range of
    the per-seed ratios, and the mean time and RSS ratios."""
    print()
    print("over calibration seeds (mean +- sample standard deviation; ratios ours / theirs)")
    head = (
        f"{'config':<19}{'seeds':>6}{'change ours':>17}{'theirs':>17}{'ratio':>7}"
        f"{'per seed':>12}{'KL ours':>9}{'theirs':>8}{'time ratio':>11}{'RSS ratio':>10}"
    )
    print(head)
    print("-" * len(head))
    for config in dict.fromkeys(r["config"] for r in rows):
        ours = [r for r in rows if r["config"] == config]
        pairs = [(r, llmc[config, r["seed"]]) for r in ours if (config, r["seed"]) in llmc]
        m, sd = _mean_sd([r["change_pct"] for r in ours])
        kl = fmean(r["kl"] for r in ours)
        line = f"{config:<19}{len(ours):>6}{m:>+9.2f}% +-{sd:>4.2f}"
        if pairs:
            tm, tsd = _mean_sd([t["change_pct"] for _, t in pairs])
            mine = fmean(r["change_pct"] for r, _ in pairs)
            each = [r["change_pct"] / t["change_pct"] for r, t in pairs]
            time_r = fmean(r["quantize_s"] / t["quantize_s"] for r, t in pairs)
            rss_r = fmean(r["peak_rss_mb"] / t["peak_rss_mb"] for r, t in pairs)
            tkl = fmean(t["kl"] for _, t in pairs)
            line += (
                f"{tm:>+9.2f}% +-{tsd:>4.2f}{mine / tm:>7.2f}"
                f"{f'{min(each):.2f}-{max(each):.2f}':>12}{kl:>9.4f}{tkl:>8.4f}"
                f"{time_r:>11.2f}{rss_r:>10.2f}"
            )
        else:
            line += f"{'':>17}{'':>7}{'':>12}{kl:>9.4f}"
        print(line)


if __name__ == "__main__":
    main()
