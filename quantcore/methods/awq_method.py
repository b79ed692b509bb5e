"""AWQ as a walker method: search activation-aware scales per group of Linears that read one
input, fold them into the module that produced that input, search clipping, then round.

One block at a time, in four steps:

1. Statistics. One pass of `forward()` with hooks records every Linear's inputs (mean |x| per
   channel, and the tensors themselves), the output of every submodule on the first call (to
   find who produced each Linear's input, by tensor identity), and the arguments (args and
   kwargs) of every module that contains a Linear (to re-run it during the search).
2. Scale search, on the float block. Linears whose first-call input is one tensor form a group
   (q/k/v; gate/up; o; down). Its producer is found by identity: a norm with a per-channel
   weight (1/s folds into its weight and bias) or a Linear (1/s folds into its output rows).
   The producer of down_proj's input, act(gate) * up, is no module's output; a narrow name
   rule treats `up_proj -> down_proj` and `v_proj -> o_proj` as Linear folds. Under
   grouped-query attention several query heads read one value head: o_proj's scales are
   then tied across the heads that share one (the mean of their exponentiated means) and
   1/s folds into that value head's rows (`shared_values`, off by default; AutoAWQ and
   llm-compressor leave o_proj unscaled there). A group with no
   foldable producer keeps s = 1 (plain rounding, still clipped). The loss of a candidate
   alpha is the output error of the smallest module holding the whole group (self_attn for
   q/k/v, mlp for gate/up, the Linear itself for o and down), re-run on its captured args:
   those of the first sequences holding `search_tokens` tokens, unless cutting them changes
   what the module computes for its first sequence (then all of them). A candidate's
   weights are rounded as step 4 begins to round them: RTN of W * s, then each row's group
   scales re-fitted on the Hessian of the group's recorded inputs X / s (`search_fit`
   "refit"; "rtn" is AWQ's own plain rounding, "descent" adds passes of code descent).
3. Folding. Each group's columns are scaled by s and 1/s is folded into its producer (a norm
   computing (1 + weight) * x, as Gemma's do, is found by a probe and folded as such); the
   block re-run on its first recorded call after all folds checks that its float outputs did
   not change (to the dtype's precision). If they did, each fold is tried alone and those
   that change them are undone.
4. Clipping and rounding. Each Linear's group ranges are clipped where that lowers the output
   error on a subsample of its (scaled) inputs, then it is rounded with RTN from the clipped
   ranges; with `refit`, each row's group scales are then re-fitted to its codes by least
   squares on the Hessian of all its recorded (scaled) inputs (gptq.refit_scales), and it is
   installed. On SmolLM2 w4 g64 asym (bench/results/quality-cpu-2core.txt) the refit took
   AWQ from +14.70% to +13.00% perplexity, KL 0.1345 to 0.1189. Then `descent_passes` of
   coordinate descent on the codes against that Hessian (gptq.descend_codes, QuantEase: each
   code in turn moved to its best grid point, the others held) and a last refit: rounding to
   nearest chooses each code alone, blind to what its row's other errors do to the output.
   Three seeds, same setting: +12.5% -> +9.9% perplexity, KL 0.121 -> 0.107, for about 5 s
   a pass (three by default).

The scale search runs on the float block: its choices are local to a group. Step 4 is
true-sequential (`true_sequential`): the Linears of each step after the first (o; gate/up;
down) are clipped, refit and descended on what the block gives them once the steps before
are rounded (one pass stopped before the step), and with `propagate` every Linear is aimed,
that fraction of the least-squares step, at what the float model computes from its own inputs
(`propagate_model`: the walker runs each block's float model alongside) instead of at its
float weights (gptq.propagation_target, GPTAQ / QEP).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantcore import precision
from quantcore.methods.awq import (
    DUO_MODES,
    accumulate_abs_mean,
    clip_ranges,
    clip_weight,
    search_scales,
)
from quantcore.methods.base import (
    ModuleDone,
    QuantScheme,
    group_by_input,
    install_quantized,
    relative_error,
)
from quantcore.methods.gptq import (
    accumulate_cross,
    accumulate_hessian,
    data_damp,
    descend_codes,
    divide_by_scales_,
    propagation_target,
    refit_scales,
)
from quantcore.methods.rtn import quantize_rtn
from quantcore.models.loading import linear_modules
from quantcore.qtensor import QuantizedWeight


@dataclass
class GroupResult:
    """What AWQ did for one group of Linears that read the same input (for reports and tests).

    fold: "norm" or "linear" when scales were folded into `producer`; None otherwise, with
    `note` saying why.
    """

    members: tuple[str, ...]
    inspected: str
    producer: str | None = None
    fold: str | None = None
    alpha: float | None = None
    duo: bool = False  # the scales also divide by the weights' means (duo scaling)
    losses: tuple[float, ...] = ()
    note: str = ""
    # For each input channel of the members, the producer's output channel it reads, where
    # several read one (grouped-query attention: o_proj's heads share v_proj's); None: one to
    # one. Their scales are then tied: one per producer channel.
    reads: torch.Tensor | None = None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _is_norm(mod: nn.Module, channels: int) -> bool:
    """A norm-like module whose output is weight * normalized(x) (+ bias), per channel."""
    w = getattr(mod, "weight", None)
    return (
        "norm" in type(mod).__name__.lower()
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
        and w.shape[0] == channels
    )


def _common_parent(names: tuple[str, ...]) -> str:
    """The smallest module holding all `names`: the Linear itself for one, else the longest
    common dotted prefix ("" is the block)."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    return ".".join(common)


class _PrecisionRun:
    """A module run in the walk's forward dtype (quantcore.precision), as the recording pass
    ran it, so the scale search compares like with like."""

    def __init__(self, module: nn.Module, weight: torch.Tensor):
        self.module, self.weight = module, weight

    def __call__(self, *args, **kwargs):
        with precision.module_runs(self.weight.device, self.weight.dtype):
            return self.module(*args, **kwargs)


class _Recorder:
    """Hooks for one pass of `forward()` over the float block (step 1)."""

    def __init__(self, block: nn.Module, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        self.abs_sum: dict[str, torch.Tensor | None] = dict.fromkeys(linears)
        self.count = dict.fromkeys(linears, 0)
        # Outputs of every submodule during the block's first call, in completion order.
        self.first_outputs: list[tuple[str, torch.Tensor]] = []
        self.first_input: dict[str, torch.Tensor] = {}
        self.calls: dict[str, list[tuple[tuple, dict]]] = {}
        self.block_outputs: list[torch.Tensor] = []
        # Each module holding a Linear: the first sequence of its output on the first call
        # (to check that slicing its calls to fewer sequences slices them right).
        self.held_outputs: dict[str, torch.Tensor] = {}
        self._hessians: dict[str, tuple[torch.Tensor, int]] = {}
        self._first_call = True
        self._last_abs: tuple[torch.Tensor, tuple[torch.Tensor, int]] | None = None
        holders = {""}
        for name in linears:
            parts = name.split(".")
            holders.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        self.calls = {n: [] for n in holders}
        self._handles = [
            block.register_forward_hook(self._block_done),
            *(m.register_forward_hook(self._linear(n)) for n, m in linears.items()),
        ]
        for name, mod in block.named_modules():
            if name:
                self._handles.append(mod.register_forward_hook(self._output(name)))
            if name in holders:
                self._handles.append(
                    mod.register_forward_pre_hook(self._call(name), with_kwargs=True)
                )

    def _block_done(self, _mod, _args, out):
        self.block_outputs.append(_first(out).detach())
        self._first_call = False

    def _linear(self, name: str):
        def hook(_mod, args, _out):
            x = args[0].detach()
            if self._first_call:
                self.first_input.setdefault(name, args[0])  # the object itself, for identity
            self.inputs[name].append(x)
            # Linears that read one tensor (q/k/v; gate/up) share its channel sums.
            if self._last_abs is None or self._last_abs[0] is not args[0]:
                self._last_abs = (args[0], accumulate_abs_mean(None, 0, x))
            batch, n = self._last_abs[1]
            total = self.abs_sum[name]
            self.abs_sum[name] = batch.clone() if total is None else total + batch
            self.count[name] += n

        return hook

    def _output(self, name: str):
        def hook(_mod, _args, out):
            if not self._first_call:
                return
            if isinstance(out, torch.Tensor):
                self.first_outputs.append((name, out))
            if name in self.calls and name not in self.held_outputs:
                # Its first call's (a module called twice in a block keeps the first).
                self.held_outputs[name] = _first(out)[:1].detach().clone()

        return hook

    def _call(self, name: str):
        def hook(_mod, args, kwargs):
            self.calls[name].append((args, dict(kwargs)))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last_abs = None

    def release(self) -> None:
        """Drop the recorded tensors (inputs, module calls, first-call outputs, Hessians); the
        per-channel means and the block's outputs stay."""
        for kept in (self.inputs, self.calls):
            for k in kept:
                kept[k] = []
        self.first_outputs, self.first_input, self.held_outputs = [], {}, {}
        self._hessians = {}

    def hessian(self, name: str) -> tuple[torch.Tensor, int]:
        """2/n sum x x^T of `name`'s recorded inputs, and n: computed once, for the scale
        search's refit and for step 4 on the recorded inputs. Not to be modified."""
        if name not in self._hessians:
            self._hessians[name] = _scaled_hessian(self.inputs[name], None)
        return self._hessians[name]

    def drop(self, name: str) -> None:
        """Forget `name`'s recorded inputs and Hessian (it is rounded)."""
        self.inputs[name] = []
        self._hessians.pop(name, None)

    def x_mean(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / self.count[name]


def _scaled_hessian(inputs: list[torch.Tensor], s: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """2/n sum x x^T of recorded inputs, as the scaled block sees them (X / s), and n."""
    width = inputs[0].shape[-1]
    h, n = torch.zeros(width, width, device=inputs[0].device), 0
    for x in inputs:
        h, n = accumulate_hessian(h, n, x)
    return (h if s is None else divide_by_scales_(h, s)), n


def _scaled_cross(
    floats: list[torch.Tensor],
    inputs: list[torch.Tensor],
    s_floats: torch.Tensor | None,
    s_inputs: torch.Tensor | None,
) -> torch.Tensor:
    """2/n sum (X - X~) X~^T, call by call, of the float inputs X (divided by `s_floats`)
    against what the rounded model feeds the Linear, X~ (divided by `s_inputs`); None: the
    tensors are already as the scaled block sees them."""
    width = inputs[0].shape[-1]
    c, n = torch.zeros(width, width, device=inputs[0].device), 0

    def scaled(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        return x.float() if s is None else x.float() / s.to(x.device)

    for xf, xq in zip(floats, inputs, strict=True):
        xq = scaled(xq, s_inputs)
        c = accumulate_cross(c, n, scaled(xf, s_floats).sub_(xq), xq)
        n += xq.reshape(-1, width).shape[0]
    return c


def _inputs_now(forward: Callable[..., object], lin: nn.Module) -> list[torch.Tensor]:
    """The inputs `lin` gets in a pass of the block as it is now; the pass stops before `lin`
    runs."""
    got: list[torch.Tensor] = []
    handle = lin.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    try:
        forward(stop_after=[lin])
    finally:
        handle.remove()
    return got


def _subsample(tensors: list[torch.Tensor], n: int) -> torch.Tensor:
    """At most `n` evenly spaced rows (tokens) of the concatenated [..., in] tensors (fp32)."""
    rows = [t.reshape(-1, t.shape[-1]) for t in tensors]
    total = sum(r.shape[0] for r in rows)
    if total <= n:
        return torch.cat(rows).float()
    wanted = torch.linspace(0, total - 1, n).round().long()
    out, start = [], 0
    for r in rows:
        sel = wanted[(wanted >= start) & (wanted < start + r.shape[0])] - start
        out.append(r[sel.to(r.device)].float())
        start += r.shape[0]
    return torch.cat(out)


def _map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """`obj` (an argument of a call) with `fn` applied to every tensor in it, through tuples,
    lists and dicts; anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _take_sequences(obj, batch: int, n: int):
    """`obj` (an argument of a call) with every tensor whose first dimension is the batch cut
    to its first `n` sequences; anything else (broadcast masks, rotary tables of batch 1,
    flags) as it is."""
    return _map_tensors(obj, lambda t: t[:n] if t.dim() and t.shape[0] == batch else t)


_CHECK_POSITIONS = 128  # of the first call, for the float32 fold check


def _take_positions(obj, seq: int, n: int):
    """`obj` (an argument of a call whose input holds `seq` positions) with every dimension of
    length `seq` cut to its first `n`: the input, position ids and rotary tables, a mask's
    rows and columns. A first dimension is taken for the batch unless it is the only one, and
    a three-dimensional tensor's last for features ([batch, seq, hidden], rotary tables)."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        dims = range(t.dim()) if t.dim() == 1 else range(1, t.dim())
        for d in dims:
            if t.shape[d] == seq and not (t.dim() == 3 and d == 2):
                t = t.narrow(d, 0, n)
        return t

    return _map_tensors(obj, cut)


def _float_check(block: nn.Module, call: tuple[tuple, dict]) -> tuple[tuple[tuple, dict], object]:
    """A call for the fold check and the block's float32 output on it: `call` cut to its first
    `_CHECK_POSITIONS` positions (a fold that is not exact changes every position's output;
    SmolLM2, 512 positions: 2.5 ms a run against 18), or whole where cutting it fails. A cut
    that runs but means something else still tests the fold: the check compares the block
    before and after on the same input."""
    x = _call_input(call)
    if isinstance(x, torch.Tensor) and x.dim() >= 3 and x.shape[1] > _CHECK_POSITIONS:
        seq = x.shape[1]
        cut = (
            _take_positions(call[0], seq, _CHECK_POSITIONS),
            _take_positions(call[1], seq, _CHECK_POSITIONS),
        )
        try:
            return cut, _first(block(*cut[0], **cut[1]))
        except (RuntimeError, ValueError, IndexError):
            pass
    return call, _first(block(*call[0], **call[1]))


def _call_input(call: tuple[tuple, dict]):
    """A module call's input: its first argument, or `hidden_states`."""
    args, kwargs = call
    return args[0] if args else kwargs.get("hidden_states")


def _batch(call: tuple[tuple, dict]) -> int | None:
    """The batch size of a module call: its input's first dimension."""
    x = _call_input(call)
    return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None


def search_calls(calls: list[tuple[tuple, dict]], tokens: int | None) -> list[tuple[tuple, dict]]:
    """About `tokens` tokens of `calls` for the scale search, which re-runs a module some 20
    times: a few thousand tokens settle one exponent as well as all of them. The first call
    cut to its first sequences when it holds enough, else whole calls from the start. None:
    every call. A call's input (its first argument) is [batch, seq, hidden]."""
    if tokens is None or not calls:
        return calls
    sizes = []
    for call in calls:
        x = _call_input(call)
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            return calls  # not the layout this knows how to cut
        sizes.append((x.shape[0], x.shape[1]))
    batch, seq = sizes[0]
    if batch * seq > tokens:
        n = -(-tokens // seq)  # sequences (ceiling)
        if n < batch:
            args, kwargs = calls[0]
            return [(_take_sequences(args, batch, n), _take_sequences(kwargs, batch, n))]
    out, have = [], 0
    for call, (b, t) in zip(calls, sizes, strict=True):
        out.append(call)
        have += b * t
        if have >= tokens:
            break
    return out


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """1.0 for a norm that scales by (1 + weight) (Gemma's RMSNorm), 0.0 for one that scales
    by weight: probed by running it with a zero weight, which gives 0 only in the latter."""
    w = norm.weight
    saved = w.data.clone()
    try:
        w.data.zero_()
        x = torch.linspace(-1, 1, w.shape[0], device=w.device, dtype=w.dtype)[None, :] + 0.5
        out = norm(x)
    finally:
        w.data.copy_(saved)
    out = out[0] if isinstance(out, tuple) else out
    return 1.0 if bool(out.float().abs().amax() > 0) else 0.0


@torch.no_grad()
def fold_scales(
    block: nn.Module,
    members: tuple[str, ...],
    producer: str,
    s: torch.Tensor,
    reads: torch.Tensor | None = None,
) -> Callable[[], None]:
    """Scale the columns of the Linears `members` by s [in] and the outputs of `producer` by
    1/s: a norm's weight and bias, or a Linear's weight rows and bias. Exact before rounding
    when the members' input is elementwise in the producer's outputs. A norm that scales by
    (1 + weight) gets weight' = (1 + weight) / s - 1. With `reads` (input channel -> the
    producer channel it reads; s tied over the channels that read one), the producer's
    channel c is divided by the s of its readers. Returns an undo."""
    prod = block.get_submodule(producer)
    s_prod = s
    if reads is not None:
        s_prod = torch.ones(prod.weight.shape[0], device=s.device).scatter_(
            0, reads.to(s.device), s.float()
        )
    prod_params = [p for p in (prod.weight, getattr(prod, "bias", None)) if p is not None]
    offset = 0.0 if isinstance(prod, nn.Linear) else norm_offset(prod)
    params = [block.get_submodule(n).weight for n in members] + prod_params
    saved = [p.data.clone() for p in params]
    for n in members:
        w = block.get_submodule(n).weight.data
        w.copy_(w.float() * s.to(w.device)[None, :])
    for p in prod_params:
        inv = 1 / s_prod.to(p.device)
        if p is prod.weight and offset:
            p.data.copy_((p.data.float() + offset) * inv - offset)
        else:
            p.data.copy_(p.data.float() * (inv[:, None] if p.dim() == 2 else inv))

    def undo() -> None:
        for p, d in zip(params, saved, strict=True):
            p.data.copy_(d)

    return undo


def _shared_values(block: nn.Module, v_name: str, v_out: int, o_in: int) -> torch.Tensor | None:
    """For grouped-query attention (transformers' `repeat_kv`): the v_proj channel each
    o_proj input channel reads, from the attention module's `head_dim` and
    `num_key_value_groups`; query head h reads key-value head h // groups. None where the
    module does not say, or its numbers do not fit the widths (the fold check would then
    undo a wrong guess anyway)."""
    parent = block.get_submodule(v_name.rsplit(".", 1)[0]) if "." in v_name else block
    d = getattr(parent, "head_dim", None)
    groups = getattr(parent, "num_key_value_groups", None)
    if not isinstance(d, int) or not isinstance(groups, int) or d <= 0 or groups <= 1:
        return None
    if v_out * groups != o_in or v_out % d:
        return None
    c = torch.arange(o_in)
    return (c // d // groups) * d + c % d


SEARCH_FITS = ("rtn", "refit", "descent")


class AWQ:
    name = "awq"
    needs_calibration = True
    # "auto" forwards stay float32: bfloat16 ones cost +0.5 points of perplexity on SmolLM2
    # (quantcore.precision).
    auto_bfloat16 = False

    def __init__(
        self,
        grid: int = 20,
        clip: bool = True,
        clip_grid: int = 20,
        max_shrink: float = 0.5,
        clip_tokens: int = 512,
        search_tokens: int | None = 2048,
        search_stride: int = 5,
        refit: bool = True,
        damp: float = 0.01,
        damp_per_feature: float = 0.7,
        duo_scaling: str = "off",
        descent_passes: int = 3,
        true_sequential: bool = True,
        propagate: float = 0.5,
        propagate_model: bool = True,
        shared_values: bool = False,
        search_fit: str = "refit",
        search_descent: int = 1,
    ):
        if search_fit not in SEARCH_FITS:
            raise ValueError(
                f"search_fit must be one of {', '.join(SEARCH_FITS)}, got {search_fit!r}"
            )
        # How the scale search rounds each candidate: "rtn" as AWQ does; "refit" also fits
        # the group scales to the codes on the inputs' Hessian, as step 4 will; "descent"
        # then moves the codes too (`search_descent` passes; a pass on a 1536 x 576 weight
        # costs some three refits, not measured end to end). An exponent judged by plain
        # RTN is the best one for a rounding step 4 does not do.
        # SmolLM2 w4 g64 asym, seeds 0-2 on an AMD EPYC: rtn +9.40% perplexity, KL 0.0998;
        # refit +9.29%, KL 0.0952 (lower on every seed), the walk up to 20% longer.
        self.search_fit = search_fit
        self.search_descent = search_descent
        # Under grouped-query attention, scale o_proj too, tied across the query heads that
        # read one value head and folded into v_proj's rows. Off: on SmolLM2 w4 g64 asym
        # (three seeds) it gave +10.5% perplexity where plain rounding of o_proj gave +9.9%,
        # KL 0.106 both; with true_sequential and propagate 0.5, +9.5% against +9.1%.
        self.shared_values = shared_values
        if not 0.0 <= propagate <= 1.0:
            raise ValueError(f"propagate must be in [0, 1], got {propagate}")
        # Rounding a step (q/k/v; o; gate/up; down) changes what the later ones read:
        # `true_sequential` clips and fits those on the inputs the rounded block gives them
        # (one stopped pass per step), and `propagate` also aims every Linear, this fraction
        # of the least-squares step, at what the float model computes from its own inputs
        # (`propagate_model`: the walker runs each block's float model alongside) or the
        # float block from its recorded ones (gptq.propagation_target, GPTAQ / QEP).
        # SmolLM2 w4 g64 asym, seeds 0-2 (bench/results/quality-cpu-2core.txt): neither
        # +9.9% perplexity, KL 0.107; true-sequential alone +10.5%, KL 0.106; aimed at the
        # float block +9.9% (0.25), +9.1% (0.5), +9.9% (1.0), KL 0.098-0.103; aimed at the
        # float model with 0.5 +8.6%, KL 0.097, in about the same time (+0.2 GB peak RSS).
        if propagate and not (true_sequential or propagate_model):
            raise ValueError("propagate needs true_sequential or propagate_model")
        if propagate_model and not propagate:
            raise ValueError("propagate_model needs propagate above 0")
        self.propagate_model = propagate_model
        self.true_sequential = true_sequential
        self.propagate = propagate
        if descent_passes < 0:
            raise ValueError(f"descent_passes must be at least 0, got {descent_passes}")
        # Coordinate descent on the rounded codes (gptq.descend_codes, QuantEase) against the
        # inputs' Hessian, then a refit: rounding to nearest chooses each code alone. On
        # SmolLM2 w4 g64 asym, three seeds: 1 pass +11.3%, 2 +10.5%, 3 +9.9% (KL 0.107);
        # a fourth changed nothing on two seeds' KL.
        self.descent_passes = descent_passes
        if duo_scaling not in DUO_MODES:
            raise ValueError(
                f"duo_scaling must be one of {', '.join(DUO_MODES)}, got {duo_scaling!r}"
            )
        # Duo scaling (awq.search_scales), llm-compressor's default, is off: on SmolLM2 w4 g64
        # asym over three seeds "on" +12.5%, "both" +12.8%, "off" +12.5%, KL 0.121-0.122
        # (measured before the code descent).
        self.duo_scaling = duo_scaling
        self.grid = grid
        # The refit's damping, as GPTQ's (gptq.data_damp): on SmolLM2 w4 g64 asym over three
        # seeds, +12.5% perplexity, KL 0.121, where 0.01 alone gave +13.4%, KL 0.125 (before
        # the code descent, which minimises the loss under the same damped Hessian).
        self.damp = damp
        self.damp_per_feature = damp_per_feature
        # After rounding, each row's group scales are re-fitted to its codes by least squares
        # on the inputs' Hessian (gptq.refit_scales): the clip search picks one shrink per
        # group on its own, the refit weighs all of a row's groups together.
        self.refit = refit
        self.search_tokens = search_tokens
        # Every 5th exponent, then halving steps around the best (awq.strided_argmin): on
        # SmolLM2's 90 searches (bench/results/awq-search-cpu-2core.txt) 9 tries instead of
        # 20 find the exhaustive choice 81 times, a loss on average 0.44% above it. The
        # attention's loss curves are jagged (one 512-token sequence), so the misses are
        # mostly a neighbour within a few percent. It never does worse than plain rounding
        # (alpha 0 is always tried).
        self.search_stride = search_stride
        self.clip = clip
        self.clip_grid = clip_grid
        self.max_shrink = max_shrink
        self.clip_tokens = clip_tokens
        self.last_groups: list[GroupResult] = []  # the groups of the last block quantized

    @property
    def wants_float_inputs(self) -> bool:
        """The walker then runs each block's float model alongside (see `walk`)."""
        return self.propagate_model

    @torch.no_grad()
    def quantize_block(
        self,
        block: nn.Module,
        modules: dict[str, tuple[nn.Linear, QuantScheme]],
        forward: Callable[..., object],
        on_module: ModuleDone,
        float_inputs: dict[str, list[torch.Tensor]] | None = None,
    ) -> dict[str, QuantizedWeight]:
        groups, scales, rec = self.scale_block(block, modules, forward)
        # Step 4: clip and round. Inputs are those of the scaled block: X / s.
        member_scale = {n: s for g, s in zip(groups, scales, strict=True) for n in g.members}
        out: dict[str, QuantizedWeight] = {}
        # The quantized Linears by shared input (q/k/v; o; gate/up; down), in the order
        # they ran.
        steps = group_by_input(rec.first_input, [n for n in rec.first_input if n in modules])
        for k, step in enumerate(steps):
            s = member_scale.get(step[0])
            recorded = not (k and self.true_sequential)
            if recorded:
                xs = rec.inputs[step[0]]
            else:
                # What the block, its earlier steps rounded, feeds this step (already X / s).
                xs, s = _inputs_now(forward, block.get_submodule(step[0])), None
            # The float inputs the step is aimed at: the float model's (`propagate_model`;
            # None in the first block, where they are the recorded ones) or the float block's.
            floats = rec.inputs[step[0]]
            if float_inputs is not None:
                floats = float_inputs[step[0]]
            hessian: tuple[torch.Tensor, int] | None = None
            cross = None
            if self.refit or self.descent_passes or self.propagate:
                if recorded:  # the scale search may have computed it already
                    h, n = rec.hessian(step[0])
                    hessian = (h if s is None else divide_by_scales_(h.clone(), s), n)
                else:
                    hessian = _scaled_hessian(xs, s)
                if self.propagate and floats is not xs:
                    cross = _scaled_cross(floats, xs, member_scale.get(step[0]), s)
            x_clip = None
            if self.clip:
                x_clip = _subsample(xs, self.clip_tokens)
                if s is not None:
                    x_clip = x_clip / s.to(x_clip.device)
            del xs, floats
            for name in step:
                lin, scheme = modules[name]
                qw = self._round(lin, scheme, x_clip, hessian, cross)
                err = install_quantized(lin, qw)
                out[name] = qw
                on_module(name, qw, err)
                rec.drop(name)  # rounded: its recorded inputs are not read again
        return out

    def _round(
        self,
        lin: nn.Linear,
        scheme: QuantScheme,
        x_clip: torch.Tensor | None,
        hessian: tuple[torch.Tensor, int] | None,
        cross: torch.Tensor | None,
    ) -> QuantizedWeight:
        """One Linear's codes: clip, round to nearest, refit, descend, refit."""
        target = lin.weight.data.float()
        damp = 0.0
        if hessian is not None:
            h, n = hessian
            damp = data_damp(self.damp, self.damp_per_feature, h.shape[0], n)
            if cross is not None:
                # Aim at what the float block computes from its own inputs (GPTAQ / QEP).
                target = propagation_target(target, h, cross, self.propagate, damp)
        w = target
        if x_clip is not None:
            bounds = clip_ranges(
                w, x_clip, scheme, self.clip_grid, self.max_shrink, lin.weight.dtype
            )
            w = clip_weight(w, bounds, scheme.group_size)
        qw = quantize_rtn(w, scheme.bits, scheme.group_size, scheme.symmetric, lin.weight.dtype)
        if hessian is None:
            return qw
        h = hessian[0]
        if self.refit:
            qw = refit_scales(target, h, qw, damp)
        if self.descent_passes:
            qw = descend_codes(target, h, qw, damp, self.descent_passes)
            if self.refit:
                qw = refit_scales(target, h, qw, damp)
        return qw

    @torch.no_grad()
    def scale_block(
        self,
        block: nn.Module,
        modules: dict[str, tuple[nn.Linear, QuantScheme]],
        forward: Callable[[], object],
        watch: Callable[[], Callable[[], None]] | None = None,
        keep_inputs: bool = True,
    ) -> tuple[list[GroupResult], list[torch.Tensor | None], _Recorder]:
        """Steps 1-3: search scales and fold them in; the block's float outputs are unchanged.

        Returns each group, its scales (None where none were applied) and the recorded
        inputs (as the float block saw them, before scaling).

        `watch` lets a caller observe the recording pass, the one full pass of the float block
        (GPTQ collects its first Hessians there instead of running a pass of its own): it is
        called just before that pass, and what it returns right after it.
        With `keep_inputs=False` the recorder's tensors are dropped once the search is done
        (for a caller that does not clip).
        """
        linears = linear_modules(block)
        rec = _Recorder(block, linears)
        end = watch() if watch is not None else None
        try:
            forward()
        finally:
            rec.remove()
            if end is not None:
                end()
        for name in modules:
            if not rec.inputs[name]:
                raise RuntimeError(f"{name} saw no calibration input; it is never called")
        # The folds are checked on the block's first call: a fold that is not exact changes
        # every sequence's outputs, so one sequence shows it at a fraction of a full pass.
        first_call, reference = rec.calls[""][0], rec.block_outputs[0]
        if precision.active() is not None:
            # The recording pass ran under autocast, whose rounding depends on the weights:
            # the check compares float32 runs, of the call's first positions only.
            first_call, reference = _float_check(block, first_call)

        groups = self._groups(block, linears, rec)
        scales: list[torch.Tensor | None] = []
        folds: list[tuple[int, GroupResult, Callable[[], None]]] = []
        for g in groups:
            scales.append(None)
            if not any(n in modules for n in g.members):
                g.note, g.fold = "no member is quantized", None
                continue
            if g.producer is None:
                continue
            schemes = [modules[n][1] if n in modules else None for n in g.members]
            search = self._search(block, g, schemes, rec)
            g.alpha, g.losses, g.duo = search.alpha, search.losses, search.duo
            if search.alpha == 0 and not search.duo:
                g.note, g.fold = "alpha 0 (plain rounding) was best", None
                continue
            # Step 3: fold (each later search re-runs only its own module on recorded inputs,
            # so it does not see this fold).
            undo = fold_scales(block, g.members, g.producer, search.scales, g.reads)
            folds.append((len(scales) - 1, g, undo))
            scales[-1] = search.scales
        if not keep_inputs:
            rec.release()
        if folds and not self._unchanged(block, first_call, reference):
            # Some fold changed the float block: undo them all, then keep those that pass alone.
            for _, _, undo in reversed(folds):
                undo()
            for i, g, _ in folds:
                undo = fold_scales(block, g.members, g.producer, scales[i], g.reads)
                if not self._unchanged(block, first_call, reference):
                    undo()
                    g.note, g.fold = f"folding into {g.producer} changed the block; undone", None
                    scales[i] = None
        self.last_groups = groups
        return groups, scales, rec

    def _groups(
        self, block: nn.Module, linears: dict[str, nn.Linear], rec: _Recorder
    ) -> list[GroupResult]:
        """Linears sharing one first-call input tensor, each with its foldable producer."""
        groups = group_by_input(rec.first_input, [n for n in linears if n in rec.first_input])
        result = []
        for members in groups:
            g = GroupResult(tuple(members), _common_parent(tuple(members)))
            x = rec.first_input[members[0]]
            channels = linears[members[0]].in_features
            for pname, out in rec.first_outputs:
                if out is not x:
                    continue
                mod = block.get_submodule(pname)
                if _is_norm(mod, channels):
                    g.producer, g.fold = pname, "norm"
                    break
                if isinstance(mod, nn.Linear) and mod.out_features == channels:
                    g.producer, g.fold = pname, "linear"
                    break
            if g.producer is None:
                self._name_rule(g, block, linears)
            result.append(g)
        return result

    def _name_rule(self, g: GroupResult, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        """Llama/Mistral/Qwen: down_proj reads act(gate_proj(x)) * up_proj(x), elementwise in
        up_proj's outputs; o_proj reads the attention-weighted values, elementwise in v_proj's
        outputs: one to one when each head has its own values, and with grouped-query
        attention each query head's channels read those of its key-value head
        (`_shared_values`). Scaling those outputs by 1/s is exact."""
        if len(g.members) != 1:
            g.note = "no foldable producer"
            return
        name = g.members[0]
        consumer = linears[name]
        for last, source in (("down_proj", "up_proj"), ("o_proj", "v_proj")):
            if not name.endswith(last):
                continue
            pname = name[: -len(last)] + source
            prod = linears.get(pname)
            if prod is not None and prod.out_features == consumer.in_features:
                g.producer, g.fold = pname, "linear"
                return
            if prod is not None and last == "o_proj" and self.shared_values:
                g.reads = _shared_values(block, pname, prod.out_features, consumer.in_features)
                if g.reads is not None:
                    g.producer, g.fold = pname, "linear"
                    return
            g.note = f"{pname} does not map onto {name}'s inputs in a way this knows"
            return
        g.note = "no foldable producer"

    def _search(self, block: nn.Module, g: GroupResult, schemes, rec: _Recorder):
        members = [block.get_submodule(n) for n in g.members]
        originals = [m.weight.data.clone() for m in members]
        inspected = _PrecisionRun(block.get_submodule(g.inspected), members[0].weight)
        full = rec.calls[g.inspected]
        calls = search_calls(full, self.search_tokens)
        cut = calls[0] is not full[0]
        held = rec.held_outputs[g.inspected]
        if len(calls) == 1 and calls[0] is full[0] and held.shape[0] == _batch(full[0]):
            # The search runs on the first call, whose whole output the recorder kept.
            refs = [held.float()]
        else:
            try:
                refs = [_first(inspected(*a, **kw)).float() for a, kw in calls]
            except RuntimeError:
                if not cut:
                    raise
                refs = None  # something in the call does not cut (a shared cache, say)
        if cut and (refs is None or not self._same_start(refs[0], rec.held_outputs[g.inspected])):
            # The cut changed what the module computes: search on every call.
            calls = full
            refs = [_first(inspected(*a, **kw)).float() for a, kw in calls]
        numel = sum(r.numel() for r in refs)

        def loss(candidates: list[torch.Tensor]) -> float:
            for m, w in zip(members, candidates, strict=True):
                m.weight.data.copy_(w.to(m.weight.dtype))
            total = 0.0
            for (a, kw), ref in zip(calls, refs, strict=True):
                total += float((_first(inspected(*a, **kw)).float() - ref).pow(2).sum())
            return total / numel

        fit = None
        if self.search_fit != "rtn":
            fit = self._search_fit(
                rec.hessian(g.members[0]), originals, schemes, members[0].weight.dtype
            )
        try:
            return search_scales(
                rec.x_mean(g.members[0]),
                originals,
                schemes,
                loss,
                self.grid,
                members[0].weight.dtype,
                self.search_stride,
                self.duo_scaling,
                g.reads,
                fit,
            )
        finally:
            for m, w in zip(members, originals, strict=True):
                m.weight.data.copy_(w)

    def _search_fit(
        self,
        hessian: tuple[torch.Tensor, int],
        weights: list[torch.Tensor],
        schemes,
        dtype: torch.dtype,
    ):
        """The scale search's rounding of a candidate W * s: RTN, then the scales re-fitted
        (and with "descent" the codes descended) on `hessian` (of the inputs X) scaled to
        X / s."""
        h_x, n = hessian
        damp = data_damp(self.damp, self.damp_per_feature, h_x.shape[0], n)
        # (W * s) (H / s s^T) = (W H) / s: refit_scales' most costly product, once per weight
        # rather than once per exponent.
        weights_h = [
            None if scheme is None else w.float() @ h_x
            for w, scheme in zip(weights, schemes, strict=True)
        ]

        def fit(i: int, ws: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            scheme = schemes[i]
            h = divide_by_scales_(h_x.clone(), s)
            qw = quantize_rtn(ws, scheme.bits, scheme.group_size, scheme.symmetric, dtype)
            qw = refit_scales(ws, h, qw, damp, weights_h[i] / s)
            if self.search_fit == "descent":
                qw = descend_codes(ws, h, qw, damp, self.search_descent)
                qw = refit_scales(ws, h, qw, damp)
            return ws.copy_(qw.dequantize(torch.float32))

        return fit

    @staticmethod
    def _same_start(ref: torch.Tensor, held: torch.Tensor) -> bool:
        """Whether the first sequence of `ref` (a module run on cut calls) is what the module
        gave on the whole first call, up to the dtype's rounding (batching changes the order
        of sums; a wrong cut changes everything)."""
        if ref.shape[1:] != held.shape[1:]:
            return False
        eps = torch.finfo(held.dtype).eps if held.is_floating_point() else 0
        return relative_error(held, ref[:1]) <= max((16 * eps) ** 2, 1e-10)

    @staticmethod
    def _unchanged(block: nn.Module, call: tuple[tuple, dict], reference: torch.Tensor) -> bool:
        """Whether the block, run on its recorded `call`, still gives `reference` (to the
        dtype's precision)."""
        out = _first(block(*call[0], **call[1]))
        eps = torch.finfo(reference.dtype).eps if reference.is_floating_point() else 0
        return relative_error(reference, out) <= max((4 * eps) ** 2, 1e-10)
