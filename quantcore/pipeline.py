"""The phases of one quantization run: resolve and load, calibrate, quantize layer by layer,
write the artifact, verify it. Callable from a notebook, the CLI's local mode or a worker."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quantcore import precision
from quantcore.artifact import write_artifact, write_model_card
from quantcore.checkpoint import LayerCheckpoint
from quantcore.data.datasets import BUILTIN, calibration_samples, check_source, evaluation_tokens
from quantcore.errors import BadRequestError
from quantcore.eval.verify import verify
from quantcore.methods.awq_method import AWQ
from quantcore.methods.base import LayerMethod, QuantScheme, SchemeMap
from quantcore.methods.gptq_method import GPTQ
from quantcore.methods.rtn_method import RTN
from quantcore.models.loading import load_lazy
from quantcore.qtensor import QuantizedWeight
from quantcore.walker import LayerEvent, ModuleEvent, walk

METHODS: dict[str, Callable[..., LayerMethod]] = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ}


@dataclass(frozen=True)
class Calibration:
    """Where calibration text comes from: a built-in or Hub dataset name, or `file` with a
    `path` to a .txt or .jsonl file (`text_field` names the JSONL key). `forward_dtype`: the
    dtype a float32 model's calibration passes run their matmuls in (quantcore.precision):
    "auto" (bfloat16 where the device has fast bfloat16 matmuls), "float32" or "bfloat16"."""

    dataset: str = BUILTIN
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    path: str | None = None
    text_field: str = "text"
    forward_dtype: str = "auto"


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
    """What a run measured and wrote. Perplexities, KL and top-1 come from verification
    (base and artifact in lockstep); decode speed and size from the artifact."""

    ppl_base: float
    ppl_quant: float
    ppl_change_pct: float
    kl: float
    top1: float
    eval_tokens: int
    eval_windows: int
    eval_seq_len: int
    ms_per_token_b1: float | None
    tokens_per_s_b8: float | None
    size_bytes: int
    artifact_path: str
    artifact_bytes: int
    artifact_format: str
    files: dict[str, dict]
    quantized_modules: int
    num_layers: int
    seconds: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def _forward_dtype(req: QuantizeRequest, device: str | torch.device) -> torch.dtype | None:
    """What the request's forward dtype resolves to for its method on `device`."""
    auto_bf16 = getattr(METHODS.get(req.method), "auto_bfloat16", False)
    return precision.resolve(req.calibration.forward_dtype, device, auto_bf16)


def request_key(req: QuantizeRequest, device: str | torch.device = "cpu") -> str:
    """A digest of everything that determines the result on `device`, checkpoints are only
    reused for it: the request, and what its forward dtype resolves to there."""
    forward = _forward_dtype(req, device)
    what = {"request": asdict(req), "forward_dtype": str(forward)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


BITS = (2, 3, 4, 8)  # the widths with a packed int32 layout


def _check_scheme(what: str, bits: int | None, group_size: int | None) -> None:
    if bits is not None and bits not in BITS:
        raise BadRequestError(
            f"{what}: {bits}-bit weights have no packed layout; use one of {BITS}"
        )
    if group_size is not None and group_size != -1 and group_size <= 0:
        raise BadRequestError(f"{what}: group_size must be positive or -1, got {group_size}")


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise BadRequestError(f"{what}: {pattern!r} is not a valid regular expression: {e}") from e


def _check(req: QuantizeRequest) -> None:
    if req.method not in METHODS:
        raise BadRequestError(f"unknown method {req.method!r}; available: {sorted(METHODS)}")
    _check_scheme("bits/group_size", req.bits, req.group_size)
    for i, pattern in enumerate(req.ignore):
        _check_regex(f"ignore[{i}]", pattern)
    for i, o in enumerate(req.overrides):
        _check_regex(f"overrides[{i}].pattern", o.pattern)
        _check_scheme(f"overrides[{i}] ({o.pattern!r})", o.bits, o.group_size)
    cal = req.calibration
    check_source(cal.dataset, cal.path, cal.n_samples, cal.seq_len)
    precision.resolve(cal.forward_dtype, "cpu")  # names a bad value before anything loads


def scheme_map(req: QuantizeRequest) -> SchemeMap:
    """The request's default scheme, its overrides in order (first match wins; unset fields
    inherit the default; `skip` leaves a module in floating point) and its ignore list."""
    default = QuantScheme(req.bits, req.group_size, req.symmetric)
    overrides = tuple(
        (
            o.pattern,
            None
            if o.skip
            else QuantScheme(
                default.bits if o.bits is None else o.bits,
                default.group_size if o.group_size is None else o.group_size,
                default.symmetric if o.symmetric is None else o.symmetric,
            ),
        )
        for o in req.overrides
    )
    return SchemeMap(default=default, overrides=overrides, ignore=tuple(req.ignore))


@dataclass
class Quantized:
    """What load, calibrate and quantize produced: the weights to write and where the
    untouched ones stream from."""

    snapshot: Path
    tokenizer: object
    quantized: Mapping[str, QuantizedWeight]  # read from the layer files on access
    replaced: dict[str, torch.Tensor]  # floats a method changed (AWQ-folded norms)
    num_layers: int
    seconds: dict[str, float]


def quantize(
    req: QuantizeRequest,
    on_progress: Callable[[Progress], None] = lambda p: None,
    should_cancel: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
    checkpoint: LayerCheckpoint | None = None,
) -> Quantized:
    """Load (a weightless skeleton), calibrate and quantize block by block, reading each
    block's weights from the snapshot's shards: host memory holds one block, not the model.

    Finished layers go to `checkpoint` (a temporary one, removed when the result is dropped,
    if none is given), and the result reads them back from there."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def phase_done(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 3)
        t = now

    _check(req)  # before the (possibly long) model load
    on_progress(Progress("load", 0, 1, f"loading {req.model_id}@{req.revision}"))
    lazy, tokenizer, snapshot = load_lazy(
        req.model_id,
        req.revision,
        on_convert=lambda msg: on_progress(Progress("load", 0, 1, msg)),
    )
    on_progress(Progress("load", 1, 1, f"{snapshot.name}: weights stay on disk until needed"))
    phase_done("load")

    cal = req.calibration
    method = METHODS[req.method](**req.method_options)
    if method.needs_calibration:
        on_progress(Progress("calibrate", 0, 1, f"{cal.n_samples} samples of {cal.seq_len} tokens"))
        samples = calibration_samples(
            tokenizer,
            cal.dataset,
            cal.n_samples,
            cal.seq_len,
            cal.seed,
            path=cal.path,
            text_field=cal.text_field,
        )
        on_progress(Progress("calibrate", 1, 1, f"{samples.shape[0]} samples ready"))
    else:  # the source was still checked (_check): a spec that names a bad one fails either way
        samples = torch.empty(0, cal.seq_len, dtype=torch.long)
        on_progress(Progress("calibrate", 1, 1, f"{req.method} is data-free: no calibration"))
    phase_done("calibrate")
    forward = None
    if method.needs_calibration:
        if lazy.dtype == torch.float32:
            forward = _forward_dtype(req, device)
        name = str(forward or lazy.dtype).removeprefix("torch.")
        how = f"{name} matmuls, float32 statistics" if forward is not None else name
        on_progress(Progress("calibrate", 1, 1, f"calibration forwards in {how}"))

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
        error = (
            "weights rounded (data-free: no output error)"
            if e.output_error is None
            else f"output error {e.output_error:.2e}"
        )
        on_progress(
            Progress(
                "quantize",
                e.layer,
                e.num_layers,
                f"layer {e.layer}/{e.num_layers} done: {error} ({e.seconds:.2f}s)",
                milestone=True,
            )
        )

    spill = None
    if checkpoint is None:
        spill = tempfile.mkdtemp(prefix="qf-layers-")
        checkpoint = LayerCheckpoint(Path(spill), request_key(req, device))
    try:
        result = walk(
            lazy,
            samples,
            method,
            scheme_map(req),
            device=device,
            on_module=module_progress,
            on_layer=layer_progress,
            should_cancel=should_cancel,
            checkpoint=checkpoint,
            forward_dtype=forward,
        )
    except BaseException:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
        raise
    if spill is not None:
        weakref.finalize(result.quantized, shutil.rmtree, spill, True)
    phase_done("quantize")
    return Quantized(
        snapshot, tokenizer, result.quantized, result.replaced, result.num_layers, seconds
    )


def run(
    req: QuantizeRequest,
    out_dir: Path,
    on_progress: Callable[[Progress], None] = lambda p: None,
    should_cancel: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
    checkpoint_dir: Path | None = None,
    fmt: str = "pack-quantized",
    card: dict | None = None,
) -> RunResult:
    """Run every phase. With `checkpoint_dir`, a run of the same request that was killed
    resumes after its last finished layer."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = LayerCheckpoint(checkpoint_dir, request_key(req, device))
    q = quantize(req, on_progress, should_cancel, device, checkpoint)
    snapshot, quantized, replaced, num_layers = q.snapshot, q.quantized, q.replaced, q.num_layers
    seconds = dict(q.seconds)
    ev = req.evaluation
    eval_tokens = evaluation_tokens(q.tokenizer, ev.dataset)
    del q
    t = time.perf_counter()

    def phase_done(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 3)
        t = now

    on_progress(Progress("save", 0, 1, f"writing {out_dir} ({fmt})"))
    num_modules = len(quantized)
    write_artifact(
        out_dir,
        snapshot,
        quantized,
        replaced,
        fmt=fmt,
        ignore=list(req.ignore),
        recipe={"quantfoundry": asdict(req)},
        # Static groups: columns reordered while quantizing, groups stay contiguous.
        actorder="weight" if req.method_options.get("act_order") else None,
        on_progress=lambda d, n, m: on_progress(Progress("save", d, n, m)),
    )
    del quantized, replaced
    phase_done("save")

    # Verify what will be published: base and our kernels over the packed bytes read back
    # from disk, window by window on the same text.
    v = verify(
        snapshot,
        out_dir,
        eval_tokens,
        ev.seq_len,
        ev.max_windows,
        device,
        on_window=lambda i, n: on_progress(Progress("verify", i, n, f"window {i}/{n}")),
        should_cancel=should_cancel,
    )
    phase_done("verify")

    figures = {**v.to_dict(), "eval_seq_len": v.seq_len}
    card_info = {"base_model": req.model_id, "spec": asdict(req), **(card or {})}
    info = write_model_card(out_dir, snapshot, {**card_info, "results": figures})
    if checkpoint is not None:
        checkpoint.clear()
    return RunResult(
        ppl_base=v.ppl_base,
        ppl_quant=v.ppl_quant,
        ppl_change_pct=v.ppl_change_pct,
        kl=v.kl,
        top1=v.top1,
        eval_tokens=v.eval_tokens,
        eval_windows=v.eval_windows,
        eval_seq_len=v.seq_len,
        ms_per_token_b1=v.ms_per_token_b1,
        tokens_per_s_b8=v.tokens_per_s_b8,
        size_bytes=v.size_bytes,
        artifact_path=str(out_dir),
        artifact_bytes=info.total_bytes,
        artifact_format=info.format,
        files=info.files,
        quantized_modules=num_modules,
        num_layers=num_layers,
        seconds=seconds,
    )
