"""The layer walker: quantize a model one decoder block at a time.

Captures the inputs of the first block, then for each block: moves it to the compute device,
lets the method quantize its Linears (running the block over the captured inputs when the
method needs statistics), runs the quantized block to produce the next block's inputs, and
moves it back. Only one block's weights are on the device at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantcore.checkpoint import LayerCheckpoint
from quantcore.errors import CancelledError
from quantcore.methods.base import LayerMethod, SchemeMap, relative_error
from quantcore.models.loading import decoder_layers, linear_modules
from quantcore.qtensor import QuantizedWeight


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
    layer: int
    num_layers: int
    output_error: float
    seconds: float


class _Captured(Exception):
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
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
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


def _run_block(block: nn.Module, batches: list[_Batch]) -> list[torch.Tensor]:
    return [_first_output(block(x.hidden, **x.kwargs)) for x in batches]


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    samples: torch.Tensor,
    method: LayerMethod,
    schemes: SchemeMap,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    on_module: Callable[[ModuleEvent], None] | None = None,
    on_layer: Callable[[LayerEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint: LayerCheckpoint | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize every decoder-block Linear of `model` in place (weights become their
    dequantized values) and return the quantized weights by full module name.

    With a `checkpoint`, each finished layer is saved, and layers an earlier run finished are
    restored instead of being quantized again.
    """
    prefix, blocks = decoder_layers(model)
    n = len(blocks)
    batches = capture_block_inputs(model, blocks, samples, batch_size, device)
    result: dict[str, QuantizedWeight] = {}
    start = checkpoint.layers_done if checkpoint is not None else 0
    if start:
        for i in range(start):
            state, quantized = checkpoint.load_layer(i)
            blocks[i].load_state_dict(state)
            result.update({f"{prefix}.{i}.{k}": qw for k, qw in quantized.items()})
        for x, h in zip(batches, checkpoint.load_inputs(), strict=True):
            x.hidden = h.to(device)
    for i in range(start, n):
        block = blocks[i]
        if should_cancel is not None and should_cancel():
            raise CancelledError(f"cancelled before layer {i + 1} of {n}")
        t0 = time.perf_counter()
        block.to(device)
        quantized, err = _quantize_block(
            block, f"{prefix}.{i}", i + 1, n, batches, method, schemes, on_module
        )
        result.update({f"{prefix}.{i}.{k}": qw.to("cpu") for k, qw in quantized.items()})
        block.to("cpu")
        if checkpoint is not None:
            checkpoint.save_layer(i, block.state_dict(), quantized, [x.hidden for x in batches])
        if on_layer is not None:
            on_layer(LayerEvent(i + 1, n, err, time.perf_counter() - t0))
    return result


def _quantize_block(
    block: nn.Module,
    name: str,
    layer: int,
    num_layers: int,
    batches: list[_Batch],
    method: LayerMethod,
    schemes: SchemeMap,
    on_module: Callable[[ModuleEvent], None] | None,
) -> tuple[dict[str, QuantizedWeight], float]:
    """Quantize one block on its device; replace `batches` by the quantized block's outputs.
    Returns the quantized weights (by name inside the block) and the block's output error."""
    reference = _run_block(block, batches)
    modules = {}
    for sub, lin in linear_modules(block).items():
        scheme = schemes.scheme_for(f"{name}.{sub}")
        if scheme is not None:
            modules[sub] = (lin, scheme)

    t_mod = time.perf_counter()

    def module_done(sub: str, _qw: QuantizedWeight, err: float) -> None:
        nonlocal t_mod
        now = time.perf_counter()
        if on_module is not None:
            on_module(ModuleEvent(layer, num_layers, f"{name}.{sub}", err, now - t_mod))
        t_mod = now

    quantized = method.quantize_block(
        block, modules, lambda: _run_block(block, batches), module_done
    )
    # The next block sees what the quantized model will feed it.
    outputs = _run_block(block, batches)
    err = sum(relative_error(r, o) for r, o in zip(reference, outputs, strict=True))
    for x, o in zip(batches, outputs, strict=True):
        x.hidden = o
    return quantized, err / max(len(outputs), 1)
