"""Peak host memory and time against model depth, printed as a table.

    python -m bench.depth [--layers 4,32] [--methods rtn,gptq] [--modes lazy,eager]

Random Llama models of one width and several depths (seeded weights, saved as safetensors
with SmolLM2's tokenizer) are quantized, each run in a fresh process whose own peak RSS
(`getrusage` maxrss) is reported after quantizing and after writing the artifact.

`lazy` is the pipeline's path (`quantcore.pipeline.quantize`: a weightless skeleton, each
block read from the shards and released when done, quantized weights spilled to per-layer
files) followed by `write_artifact`. `eager` loads the whole model with `from_pretrained`
and walks it in memory, as the pipeline did before: the baseline the lazy path improves on.
The issue's goal: peak RSS grows by less than 15% from 4 to 32 layers on the lazy path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(out: Path, layers: int, hidden: int, intermediate: int, seed: int = 0) -> None:
    """A random Llama of `layers` blocks, saved as safetensors with SmolLM2's tokenizer.
    Built in its own process, so the parent never holds a model."""
    import torch
    from huggingface_hub import constants
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantcore.models import smollm2

    snap = smollm2.prepare(Path(constants.HF_HUB_CACHE))
    tok = AutoTokenizer.from_pretrained(snap)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, max_shard_size="500MB")
    tok.save_pretrained(out)


def run_one(model_dir: str, method: str, mode: str, samples: int, seq_len: int) -> dict:
    from quantcore.pipeline import Calibration, QuantizeRequest, quantize

    req = QuantizeRequest(
        model_id=model_dir,
        method=method,
        bits=4,
        group_size=128,
        calibration=Calibration(n_samples=samples, seq_len=seq_len),
        method_options={"act_order": True} if method == "gptq" else {},
    )
    t0 = time.perf_counter()
    if mode == "eager":
        from quantcore.data.datasets import calibration_samples
        from quantcore.models.loading import load_causal_lm
        from quantcore.pipeline import METHODS, scheme_map
        from quantcore.walker import walk

        model, tok, _ = load_causal_lm(model_dir)
        cal = req.calibration
        ids = calibration_samples(tok, cal.dataset, cal.n_samples, cal.seq_len, cal.seed)
        result = walk(model, ids, METHODS[method](**req.method_options), scheme_map(req))
        quantized = len(result.quantized)
        return {
            "quantize_s": time.perf_counter() - t0,
            "rss_quantize_mb": _rss_mb(),
            "modules": quantized,
        }

    from quantcore.artifact import write_artifact

    q = quantize(req, device="cpu")
    t1 = time.perf_counter()
    rss_q = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        write_artifact(
            Path(tmp) / "artifact",
            q.snapshot,
            q.quantized,
            q.replaced,
            ignore=list(req.ignore),
            recipe={},
            actorder="weight" if method == "gptq" else None,
        )
    return {
        "quantize_s": t1 - t0,
        "save_s": time.perf_counter() - t1,
        "rss_quantize_mb": rss_q,
        "rss_save_mb": _rss_mb(),
        "modules": len(q.quantized),
    }


def _child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.depth", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="4,32")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--modes", default="lazy,eager")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--build", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, metavar=("DIR", "METHOD", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build:
        build(Path(a.build[0]), int(a.build[1]), a.hidden, a.intermediate)
        print(json.dumps({"built": a.build[0]}))
        return
    if a.one:
        print(json.dumps(run_one(*a.one, a.samples, a.seq_len)))
        return

    shape = ["--hidden", str(a.hidden), "--intermediate", str(a.intermediate)]
    calib = ["--samples", str(a.samples), "--seq-len", str(a.seq_len)]
    rows = []
    root = Path(tempfile.mkdtemp(prefix="qf-depth-"))
    try:
        for n in [int(x) for x in a.layers.split(",")]:
            model_dir = root / f"llama-{n}"
            _child(["--build", str(model_dir), str(n), *shape])
            size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
            for mode in a.modes.split(","):
                for method in a.methods.split(","):
                    r = _child(["--one", str(model_dir), method, mode, *shape, *calib])
                    rows.append(
                        {"layers": n, "mode": mode, "method": method, "mb": size / 2**20, **r}
                    )
                    print(f"done {n} layers {mode} {method}", file=sys.stderr, flush=True)
            shutil.rmtree(model_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"Random Llama, hidden {a.hidden}, intermediate {a.intermediate}, fp32, tied embeddings "
        f"(vocab 49152); w4 g128 asym; calibration {a.samples}x{a.seq_len} tokens; CPU"
    )
    head = (
        f"{'layers':>6} {'mode':<6}{'method':<7}{'weights MB':>11}{'quantize s':>11}"
        f"{'save s':>8}{'RSS quantize MB':>16}{'RSS +save MB':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        save_s = f"{r['save_s']:.1f}" if "save_s" in r else "-"
        rss_s = f"{r['rss_save_mb']:.0f}" if "rss_save_mb" in r else "-"
        print(
            f"{r['layers']:>6} {r['mode']:<6}{r['method']:<7}{r['mb']:>11.0f}"
            f"{r['quantize_s']:>11.1f}{save_s:>8}{r['rss_quantize_mb']:>16.0f}{rss_s:>13}"
        )
    print()
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = sorted(
                (r for r in rows if r["mode"] == mode and r["method"] == method),
                key=lambda r: r["layers"],
            )
            if len(sel) >= 2:
                lo, hi = sel[0], sel[-1]
                for key in ("rss_quantize_mb", "rss_save_mb"):
                    if key in lo:
                        growth = 100 * (hi[key] / lo[key] - 1)
                        print(
                            f"{mode} {method}: peak RSS ({key[4:-3]}) {lo['layers']} -> "
                            f"{hi['layers']} layers: {growth:+.1f}%"
                        )


if __name__ == "__main__":
    main()
