"""The layer walker: quantize a model one decoder block at a time.

Captures the inputs of the first block, then for each block: brings its weights to the compute
device (from the snapshot's shards when the model is a `LazyModel` skeleton), lets the method
quantize its Linears (running the block over the captured inputs when the method needs
statistics), runs the quantized block to produce the next block's inputs, keeps what changed
and lets the block go. Only one block's weights are on the device, and with a lazy model only
one block's float weights are in host memory too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from quantcore import precision
from quantcore.checkpoint import LayerCheckpoint
from quantcore.errors import CancelledError
from quantcore.methods.base import LayerMethod, SchemeMap
from quantcore.models.lazy import LazyModel
from quantcore.models.loading import decoder_layers, linear_modules
from quantcore.qtensor import QuantizedWeight
from quantcore.replay import FrozenOutputs


@dataclass(frozen=True)
class ModuleEvent:
    """Reported after each module: layer i of N (1-based), module name, error, seconds."""

    layer: int
    num_layers: int
    module: str
    error: float
    seconds: float


@dataclass(frozen=True)
class LayerEvent:
    """output_error: the block's relative output error on the calibration inputs; None for a
    data-free method (RTN), whose walk runs no block."""

    layer: int
    num_layers: int
    output_error: float | None
    seconds: float


@dataclass
class WalkResult:
    """What the walk produced.

    quantized: Linear name -> QuantizedWeight (read from the checkpoint's files on access when
        the walk had one, so holding it costs no memory).
    replaced: full tensor name -> float tensor of a block that the method changed but did not
        quantize (AWQ folds into norms, or into Linears left in floating point).
    """

    quantized: Mapping[str, QuantizedWeight]
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    num_layers: int = 0


class _Captured(Exception):
    pass


class _StopBlock(Exception):
    pass


@dataclass
class _Batch:
    hidden: torch.Tensor
    kwargs: dict


def _first_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor, batch_size: int, device
) -> list[_Batch]:
    """Run the embeddings for each batch and stop at the first block, keeping its inputs."""
    captured: list[_Batch] = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["use_cache"] = False
        for name in ("cache", "past_key_values", "past_key_value"):  # by transformers version
            kw.pop(name, None)
        captured.append(_Batch(hidden.detach(), kw))
        raise _Captured

    # Only the parts before the first block run, so they alone need to be on the device.
    before = _modules_before_blocks(model, blocks)
    for m in before:
        m.to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(input_ids=samples[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
        for m in before:
            m.to("cpu")
    return captured


def _modules_before_blocks(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """What the forward pass runs before the first block: the input embeddings and the rotary
    embedding module (if the model has one outside its blocks)."""
    block_ids = {id(m) for m in blocks.modules()}
    out = [model.get_input_embeddings()]
    for m in model.modules():
        if id(m) not in block_ids and "rotary" in type(m).__name__.lower():
            out.append(m)
    return out


def _capture_lazy(
    lazy: LazyModel, blocks: nn.ModuleList, samples: torch.Tensor, batch_size: int, device
) -> list[_Batch]:
    """First-block inputs of a lazy model: its weights outside the blocks (embeddings and
    whatever else runs before them; not an untied output head) are read for this step only."""
    head = lazy.model.get_output_embeddings()
    embed = lazy.model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    parts = [m for m in lazy.outside(blocks) if tied or m is not head]
    for m in parts:
        lazy.materialize(m, "cpu")
    try:
        return capture_block_inputs(lazy.model, blocks, samples, batch_size, device)
    finally:
        for m in parts:
            lazy.release(m)


def _run_block(
    block: nn.Module,
    batches: list[_Batch],
    stop_after: Collection[nn.Module] = (),
    frozen: FrozenOutputs | None = None,
    record: bool = True,
) -> list[torch.Tensor] | None:
    """The block's outputs for every batch; with `stop_after`, each batch stops as soon as all
    of those modules have been called once (their forward pre-hooks have their inputs; the
    last of them does not run) and nothing is returned.
    With `frozen`, submodules whose outputs cannot have changed since an earlier pass are
    replayed (and, with `record`, this pass's such outputs are kept for later passes)."""
    if frozen is None:
        return _run_batches(block, batches, stop_after, None)
    with frozen.run(record):
        return _run_batches(block, batches, stop_after, frozen)


def _run_batches(
    block: nn.Module,
    batches: list[_Batch],
    stop_after: Collection[nn.Module],
    frozen: FrozenOutputs | None,
) -> list[torch.Tensor] | None:
    weight = next(block.parameters(), None)
    device = batches[0].hidden.device if batches else "cpu"
    # The walk's forward dtype (quantcore.precision): every block call of the pass autocasts.
    autocast = precision.module_runs(device, weight.dtype if weight is not None else torch.float32)
    if not stop_after:
        with autocast:
            outs = []
            for i, x in enumerate(batches):
                if frozen is not None:
                    frozen.begin_batch(i)
                outs.append(_first_output(block(x.hidden, **x.kwargs)))
        return outs
    seen: set[int] = set()

    def hook(mod, _args):
        seen.add(id(mod))
        if len(seen) == len(stop_after):
            raise _StopBlock

    # Registered after the method's own pre-hooks, so those see the last module's input
    # before the pass stops; that module itself does not run (its output is not needed).
    handles = [m.register_forward_pre_hook(hook) for m in stop_after]
    try:
        with autocast:
            for i, x in enumerate(batches):
                seen.clear()
                if frozen is not None:
                    frozen.begin_batch(i)
                try:
                    block(x.hidden, **x.kwargs)
                except _StopBlock:
                    pass
    finally:
        for h in handles:
            h.remove()
    return None


@torch.no_grad()
def quantize_model(
    model: nn.Module | LazyModel,
    samples: torch.Tensor,
    method: LayerMethod,
    schemes: SchemeMap,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    on_module: Callable[[ModuleEvent], None] | None = None,
    on_layer: Callable[[LayerEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint: LayerCheckpoint | None = None,
    forward_dtype: torch.dtype | None = None,
) -> Mapping[str, QuantizedWeight]:
    """`walk`'s quantized weights by full module name (see `walk`)."""
    return walk(
        model,
        samples,
        method,
        schemes,
        device=device,
        batch_size=batch_size,
        on_module=on_module,
        on_layer=on_layer,
        should_cancel=should_cancel,
        checkpoint=checkpoint,
        forward_dtype=forward_dtype,
    ).quantized


@torch.no_grad()
def walk(
    model: nn.Module | LazyModel,
    samples: torch.Tensor,
    method: LayerMethod,
    schemes: SchemeMap,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    on_module: Callable[[ModuleEvent], None] | None = None,
    on_layer: Callable[[LayerEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint: LayerCheckpoint | None = None,
    forward_dtype: torch.dtype | None = None,
) -> WalkResult:
    """Quantize every decoder-block Linear that `schemes` selects.

    An `nn.Module` is quantized in place: its weights become their dequantized values, and it
    stays whole in memory. A `LazyModel` is read block by block from its snapshot and keeps
    nothing: each block's float weights are released once the block is done.

    The block runs on `batch_size` calibration sequences at a time: a pass's activations
    (attention scores, MLP intermediates) grow with it. One at a time peaks about 170 MB lower
    than eight on SmolLM2 with 512-token sequences, and is no slower on 2 CPU cores
    (bench/results/quality-cpu-2core.txt).

    With a `checkpoint`, each finished layer (quantized weights, changed floats, the next
    layer's inputs) is saved, layers an earlier run finished are restored instead of being
    quantized again, and the returned quantized weights are read from its files on access.

    With `forward_dtype` (bfloat16), a float32 model's calibration passes run their matmuls
    under autocast to it; everything the methods compute from them stays float32
    (quantcore.precision).
    """
    lazy = model if isinstance(model, LazyModel) else None
    module = lazy.model if lazy is not None else model
    prefix, blocks = decoder_layers(module)
    n = len(blocks)
    # A data-free method's weights do not depend on the inputs: no block needs to run.
    if not method.needs_calibration:
        batches = []
    elif lazy is not None:
        batches = _capture_lazy(lazy, blocks, samples, batch_size, device)
    else:
        batches = capture_block_inputs(module, blocks, samples, batch_size, device)
    # The float model's own block inputs, for a method that wants them (it corrects for what
    # the layers already quantized changed): the same tensors until a block has run.
    floats = [x.hidden for x in batches] if getattr(method, "wants_float_inputs", False) else None
    kept: dict[str, QuantizedWeight] = {}
    replaced: dict[str, torch.Tensor] = {}
    start = checkpoint.layers_done if checkpoint is not None else 0
    if start:
        for i in range(start):
            quantized, changed = checkpoint.load_layer(i)
            replaced.update(changed)
            if lazy is None:
                install(module, quantized, changed)
        saved = [h.to(device) for h in checkpoint.load_inputs()]
        if len(saved) != len(batches) * (2 if floats is not None else 1):
            raise RuntimeError("the checkpoint's saved inputs do not match this walk")
        for x, h in zip(batches, saved, strict=False):
            x.hidden = h
        if floats is not None:
            floats = saved[len(batches) :]
    for i in range(start, n):
        block = blocks[i]
        name = f"{prefix}.{i}"
        if should_cancel is not None and should_cancel():
            raise CancelledError(f"cancelled before layer {i + 1} of {n}")
        t0 = time.perf_counter()
        if lazy is not None:
            lazy.materialize(block, device)
        else:
            block.to(device)
        before = _unquantized_tensors(block, name, schemes)
        with precision.forward_dtype(forward_dtype):
            quantized, err, floats = _quantize_block(
                block, name, i + 1, n, batches, method, schemes, on_module, floats
            )
        quantized = {f"{name}.{k}": qw.to("cpu") for k, qw in quantized.items()}
        changed = _changed(block, name, before, lazy)
        replaced.update(changed)
        if lazy is not None:
            lazy.release(block)
        else:
            block.to("cpu")
        if checkpoint is not None:
            checkpoint.save_layer(
                i, quantized, changed, [x.hidden for x in batches] + (floats or [])
            )
        else:
            kept.update(quantized)
        del quantized, before
        if on_layer is not None:
            on_layer(LayerEvent(i + 1, n, err, time.perf_counter() - t0))
    result = checkpoint.quantized() if checkpoint is not None else kept
    return WalkResult(result, replaced, n)


def _unquantized_tensors(
    block: nn.Module, name: str, schemes: SchemeMap
) -> dict[str, torch.Tensor]:
    """Copies of the block's parameters that will not be quantized (norms, biases, Linears
    left in floating point): a method may still change them, and then they must be kept."""
    quantized = {
        f"{sub}.weight"
        for sub in linear_modules(block)
        if schemes.scheme_for(f"{name}.{sub}") is not None
    }
    return {k: p.detach().clone() for k, p in block.named_parameters() if k not in quantized}


def _changed(
    block: nn.Module, name: str, before: dict[str, torch.Tensor], lazy: LazyModel | None
) -> dict[str, torch.Tensor]:
    """The block's tensors that differ from `before`, by the name the snapshot stores them."""
    params = dict(block.named_parameters())
    out = {}
    for k, old in before.items():
        p = params[k]
        if not torch.equal(old, p):
            stored = lazy.stored_name(p) if lazy is not None else None
            out[stored or f"{name}.{k}"] = p.detach().to("cpu", copy=True)
    return out


@torch.no_grad()
def install(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    changed: Mapping[str, torch.Tensor],
) -> None:
    """Put walk results (by full name) into an in-memory model: dequantized weights and the
    floats the method changed, exactly as the walk left them."""
    for full, qw in quantized.items():
        w = model.get_submodule(full).weight
        w.copy_(qw.dequantize(w.dtype))
    params = dict(model.named_parameters())
    for full, t in changed.items():
        params[full].copy_(t)


def _quantize_block(
    block: nn.Module,
    name: str,
    layer: int,
    num_layers: int,
    batches: list[_Batch],
    method: LayerMethod,
    schemes: SchemeMap,
    on_module: Callable[[ModuleEvent], None] | None,
    floats: list[torch.Tensor] | None = None,
) -> tuple[dict[str, QuantizedWeight], float | None, list[torch.Tensor] | None]:
    """Quantize one block on its device; replace `batches` by the quantized block's outputs.
    Returns the quantized weights (by name inside the block), the block's output error
    (None without batches: a data-free method) and, given the float model's block inputs
    `floats`, its outputs (the float model's next block inputs)."""
    modules = {}
    for sub, lin in linear_modules(block).items():
        scheme = schemes.scheme_for(f"{name}.{sub}")
        if scheme is not None:
            modules[sub] = (lin, scheme)

    # The float block's outputs: a calibrating method's first full pass computes them anyway
    # (it must run the block in full before changing a weight), so that pass is kept.
    state: dict = {"reference": None, "changed": False}
    if batches and not method.needs_calibration:
        state["reference"] = _run_block(block, batches)

    # Passes after a module is done replay what cannot have changed (attention once q/k/v/o
    # are final, ...) instead of recomputing it.
    frozen = FrozenOutputs(block, modules)

    def forward(stop_after: Collection[nn.Module] = ()) -> list[torch.Tensor] | None:
        outs = _run_block(block, batches, stop_after, frozen)
        if state["reference"] is None and not stop_after and not state["changed"]:
            state["reference"] = outs
        return outs

    t_mod = time.perf_counter()

    def module_done(sub: str, _qw: QuantizedWeight, err: float) -> None:
        nonlocal t_mod
        state["changed"] = True
        frozen.done(sub)
        now = time.perf_counter()
        if on_module is not None:
            on_module(ModuleEvent(layer, num_layers, f"{name}.{sub}", err, now - t_mod))
        t_mod = now

    extra = {}
    float_out = None
    if floats is not None:
        # Until a block has run the two streams are one: the float pass below would repeat
        # the method's first pass, and the method has nothing to correct.
        same = all(f is x.hidden for f, x in zip(floats, batches, strict=True))
        float_inputs = None
        if not same:
            float_inputs, float_out = _float_pass(block, modules, batches, floats)
        extra["float_inputs"] = float_inputs
    quantized = method.quantize_block(block, modules, forward, module_done, **extra)
    if not batches:
        return quantized, None, None
    reference = state["reference"]
    if reference is None:
        raise RuntimeError(
            f"method {method.name!r} changed block {name} before running it in full once"
        )
    # The next block sees what the quantized model will feed it.
    outputs = _run_block(block, batches, frozen=frozen, record=False)
    frozen.clear()
    # Over all batches at once (not a mean of per-batch ratios): independent of the batching.
    pairs = zip(reference, outputs, strict=True)
    diff = sum(float((r.float() - o.float()).pow(2).sum()) for r, o in pairs)
    norm = sum(float(r.float().pow(2).sum()) for r in reference)
    for x, o in zip(batches, outputs, strict=True):
        x.hidden = o
    if floats is not None and float_out is None:
        float_out = reference
    return quantized, diff / max(norm, 1e-30), float_out


def _float_pass(
    block: nn.Module,
    modules: dict[str, tuple[nn.Linear, object]],
    batches: list[_Batch],
    floats: list[torch.Tensor],
) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """Run the still-float block on the float model's own inputs: each quantized Linear's
    input on every call (Linears that read one tensor share it) and the block's outputs."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def record(name: str):
        def hook(_mod, args):
            seen[name].append(args[0].detach())

        return hook

    handles = [lin.register_forward_pre_hook(record(n)) for n, (lin, _) in modules.items()]
    try:
        outs = _run_batches(
            block, [_Batch(f, x.kwargs) for f, x in zip(floats, batches, strict=True)], (), None
        )
    finally:
        for h in handles:
            h.remove()
    return seen, outs
