"""The phases of one quantization run: resolve and load, calibrate, quantize layer by layer,
write the artifact, verify it. Callable from a notebook, the CLI's local mode or a worker."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quantcore.artifact import load_quantized, write_artifact
from quantcore.checkpoint import LayerCheckpoint
from quantcore.data.datasets import BUILTIN, calibration_samples, evaluation_tokens
from quantcore.errors import BadRequestError, CancelledError
from quantcore.eval.perplexity import perplexity
from quantcore.methods.awq_method import AWQ
from quantcore.methods.base import LayerMethod, QuantScheme, SchemeMap
from quantcore.methods.gptq_method import GPTQ
from quantcore.methods.rtn_method import RTN
from quantcore.models.loading import load_causal_lm
from quantcore.walker import LayerEvent, ModuleEvent, quantize_model

METHODS: dict[str, Callable[..., LayerMethod]] = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ}


@dataclass(frozen=True)
class Calibration:
    """Where calibration text comes from: a built-in or Hub dataset name, or `file` with a
    `path` to a .txt or .jsonl file (`text_field` names the JSONL key)."""

    dataset: str = BUILTIN
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    path: str | None = None
    text_field: str = "text"


@dataclass(frozen=True)
class Override:
    """A different scheme for modules whose name matches `pattern` (None: the default's),
    or `skip` to leave them in floating point. The first match wins."""

    pattern: str
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    skip: bool = False


@dataclass(frozen=True)
class Evaluation:
    dataset: str = BUILTIN
    seq_len: int = 512
    max_windows: int | None = 16


@dataclass(frozen=True)
class QuantizeRequest:
    model_id: str
    revision: str = "main"
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    calibration: Calibration = field(default_factory=Calibration)
    evaluation: Evaluation = field(default_factory=Evaluation)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[Override, ...] = ()
    method_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """A phase's progress: `done` of `total` steps, with a line for people."""

    phase: str
    done: int
    total: int
    message: str
    milestone: bool = False  # a layer finished: worth recording even when updates are throttled


@dataclass
class RunResult:
    ppl_base: float
    ppl_quant: float
    ppl_change_pct: float
    eval_tokens: int
    eval_windows: int
    eval_seq_len: int
    artifact_path: str
    artifact_bytes: int
    quantized_modules: int
    num_layers: int
    seconds: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def request_key(req: QuantizeRequest) -> str:
    """A digest of everything that determines the result: checkpoints are only reused for it."""
    return hashlib.sha256(json.dumps(asdict(req), sort_keys=True, default=str).encode()).hexdigest()


def _check(req: QuantizeRequest) -> None:
    if req.method not in METHODS:
        raise BadRequestError(f"unknown method {req.method!r}; available: {sorted(METHODS)}")
    if req.group_size != -1 and req.group_size <= 0:
        raise BadRequestError(f"group_size must be positive or -1, got {req.group_size}")


def run(
    req: QuantizeRequest,
    out_dir: Path,
    on_progress: Callable[[Progress], None] = lambda p: None,
    should_cancel: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
    checkpoint_dir: Path | None = None,
) -> RunResult:
    """Run every phase. With `checkpoint_dir`, a run of the same request that was killed
    resumes after its last finished layer (and skips the base evaluation it already did)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = LayerCheckpoint(checkpoint_dir, request_key(req))
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def phase_done(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 3)
        t = now

    _check(req)  # before the (possibly long) model load
    on_progress(Progress("load", 0, 1, f"loading {req.model_id}@{req.revision}"))
    model, tokenizer, snapshot = load_causal_lm(req.model_id, req.revision)
    phase_done("load")

    ev = req.evaluation
    eval_tokens = evaluation_tokens(tokenizer, ev.dataset)

    def eval_progress(phase: str, label: str) -> Callable[[int, int], None]:
        def window_done(i: int, n: int) -> None:
            on_progress(Progress(phase, i, n, f"{label}: window {i}/{n}"))
            # Long evaluations stop between windows, as quantization stops between layers.
            if should_cancel is not None and i < n and should_cancel():
                raise CancelledError(f"cancelled during {phase} (window {i} of {n})")

        return window_done

    base = checkpoint.value("ppl_base") if checkpoint is not None else None
    if base is None:
        model.to(device)
        base = perplexity(
            model,
            eval_tokens,
            ev.seq_len,
            ev.max_windows,
            device,
            eval_progress("evaluate_base", "base model perplexity"),
        ).ppl
        model.to("cpu")
        if checkpoint is not None:
            checkpoint.set_value("ppl_base", base)
    phase_done("evaluate_base")

    cal = req.calibration
    on_progress(Progress("calibrate", 0, 1, f"{cal.n_samples} samples of {cal.seq_len} tokens"))
    samples = calibration_samples(tokenizer, cal.dataset, cal.n_samples, cal.seq_len, cal.seed)
    phase_done("calibrate")

    scheme = QuantScheme(req.bits, req.group_size, req.symmetric)
    schemes = SchemeMap(default=scheme, ignore=req.ignore)

    def module_progress(e: ModuleEvent) -> None:
        on_progress(
            Progress(
                "quantize",
                e.layer - 1,
                e.num_layers,
                f"layer {e.layer}/{e.num_layers} {e.module}: "
                f"error {e.error:.2e} ({e.seconds:.2f}s)",
            )
        )

    def layer_progress(e: LayerEvent) -> None:
        on_progress(
            Progress(
                "quantize",
                e.layer,
                e.num_layers,
                f"layer {e.layer}/{e.num_layers} done: output error "
                f"{e.output_error:.2e} ({e.seconds:.2f}s)",
                milestone=True,
            )
        )

    quantized = quantize_model(
        model,
        samples,
        METHODS[req.method](**req.method_options),
        schemes,
        device=device,
        on_module=module_progress,
        on_layer=layer_progress,
        should_cancel=should_cancel,
        checkpoint=checkpoint,
    )
    num_layers = len({k.rsplit(".", 2)[0] for k in quantized})
    phase_done("quantize")

    on_progress(Progress("save", 0, 1, f"writing {out_dir}"))
    info = write_artifact(
        model,
        quantized,
        snapshot,
        out_dir,
        (req.bits, req.group_size, req.symmetric),
        list(req.ignore),
        recipe={"quantfoundry": asdict(req)},
        # Static groups: columns reordered while quantizing, groups stay contiguous.
        actorder="weight" if req.method_options.get("act_order") else None,
    )
    del model
    phase_done("save")

    # Verify what will be published: our kernels over the packed bytes read back from disk.
    qmodel = load_quantized(out_dir).to(device)
    quant = perplexity(
        qmodel,
        eval_tokens,
        ev.seq_len,
        ev.max_windows,
        device,
        eval_progress("verify", "quantized model perplexity"),
    )
    phase_done("verify")

    if checkpoint is not None:
        checkpoint.clear()
    return RunResult(
        ppl_base=base,
        ppl_quant=quant.ppl,
        ppl_change_pct=100.0 * (quant.ppl / base - 1.0),
        eval_tokens=quant.tokens,
        eval_windows=quant.windows,
        eval_seq_len=ev.seq_len,
        artifact_path=str(out_dir),
        artifact_bytes=info.total_bytes,
        quantized_modules=len(quantized),
        num_layers=num_layers,
        seconds=seconds,
    )
