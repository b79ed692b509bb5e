"""GPTQ as a walker method: collect each Linear's input Hessian with hooks, then quantize.

True-sequential: Linears that read the same input (q/k/v; gate/up) form one step; each step's
Hessians are collected with the earlier steps already quantized, so later Linears see the
inputs the quantized model will really give them. A step's Linears share one Hessian and,
with one scheme, are quantized as one stacked weight.

By default each block first gets AWQ's activation-aware channel scales (searched on the
first 512 calibration tokens, as good as 2048 in bench/gptq_variants.py; folded into the
producing norm or Linear so the float block is unchanged): salient input channels are scaled
up before GPTQ rounds them; and each group's range is searched for the lowest rounding error
(`mse`) instead of taken from min/max. On SmolLM2 w4 g64 asym, 8x512 calibration tokens
(bench/results/): plain GPTQ +21.4% to +22.8% perplexity, with `mse` +17.9%, with AWQ scales
+14.2%, with both +10.9% (llm-compressor's GPTQ: +21.4%).
After GPTQ has chosen a weight's codes, each row's group scales are re-fitted to them by least
squares on H (`refit`, gptq.refit_scales): GPTQ's own objective, which the scales (fitted to
the weights alone) do not minimise. Same setting, same machine: +11.93% -> +10.85% perplexity,
KL 0.1163 -> 0.1150, for about a second of the ~40 s run.

Each Hessian is damped by at least `damp_per_feature` times its width over the tokens it was
estimated from (gptq.data_damp): with 8x512 calibration tokens, 0.1 for a 576-wide input and
0.26 for a 1536-wide one where GPTQ's usual 0.01 overfits the calibration text (a held-out
Hessian's loss of the same codes is 7% lower, bench/results/quality-cpu-2core.txt); with
plenty of data it falls to `damp`. Over five calibration seeds on the setting above:
perplexity +10.5% on average, KL 0.102 (llm-compressor's GPTQ on the same tokens: +18.7%,
KL 0.179), where `damp` 0.01 alone gave +12.7%, KL 0.120 (three seeds).

`descent_passes` (off by default) runs coordinate descent on the codes after GPTQ
(gptq.descend_codes, QuantEase): it lowers the calibration loss, but on SmolLM2 it did not
lower the held-out perplexity over three seeds, at about 7 s a pass.

`propagate` (off by default) also corrects each Linear for what the layers quantized before it
changed in its inputs (GPTAQ / QEP, gptq.propagation_target): the walker runs the float model
alongside, which costs a float pass per block and the float inputs of every Linear. With 0.25
on that setting: +10.50%, KL 0.1056, but about 1.5x the time and +160 MB peak RSS.
`awq_duo` chooses AWQ's duo scaling for those scales (awq.search_scales); "on" gave +10.7%
perplexity, KL 0.105 over three seeds where the default ("off") gave +11.0%, KL 0.102.
`awq_shared_values` (off) also scales o_proj under grouped-query attention (awq_method's
`shared_values`): seeds 0-2 gave +10.6% perplexity, KL 0.103, against +10.1%, KL 0.104.
`awq_scales=False, mse=False, refit=False, damp_per_feature=0` is plain GPTQ.

On a CPU with AVX512-BF16 the walker runs the block passes and the scale search with bfloat16
matmuls (quantcore.precision; the Hessians and all of the above stay float32): over five
seeds +10.7% perplexity, KL 0.103, in 0.79x llm-compressor's time on an AMD EPYC (float32
forwards, seed 0, the same day: 1.06x); on a Xeon with AMX, after the walk's copies and
gathers were trimmed, +9.8%, KL 0.102, in 0.65x its time (0.63x-0.66x per seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from quantcore.methods.awq_method import AWQ
from quantcore.methods.base import ModuleDone, QuantScheme, group_by_input, install_quantized
from quantcore.methods.gptq import (
    GPTQConfig,
    accumulate_cross,
    accumulate_hessian,
    data_damp,
    divide_by_scales_,
    gptq_quantize,
    propagation_target,
)
from quantcore.qtensor import QuantizedWeight


class _Stats:
    """Running Hessians for a set of Linears, and the input tensor each of them saw first.

    Linears that read the very same input tensor (q/k/v; gate/up) share one Hessian: it is
    accumulated once, by the first of them called (its owner).
    With `first_step_only`, a Hessian is accumulated only for the Linears that read the same
    input as the first one called (the first true-sequential step): the others' would be
    collected again, after that step is quantized."""

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        first_step_only: bool = False,
        float_inputs: dict[str, list[torch.Tensor]] | None = None,
    ):
        self._modules = modules
        self.h: dict[str, torch.Tensor] = {}  # by owner
        # With the float model's inputs of each call, also C = (X - X~) X~^T, by owner.
        self._float_inputs = float_inputs
        self.c: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # module -> the module whose Hessian it shares
        self.calls = dict.fromkeys(modules, 0)
        # The first input each module saw, kept alive so that tensor identity is meaningful
        # (the id of a freed tensor can be reused by a later one).
        self.first_input: dict[str, torch.Tensor] = {}
        self._first_step_only = first_step_only
        self._leader: str | None = None  # the first Linear called
        self._leader_input: torch.Tensor | None = None  # its input in the current batch
        self._last: tuple[torch.Tensor, str] | None = None  # the last owner's input, and it
        self._handles: list = []

    def attach(self) -> _Stats:
        """Register the hooks (until `remove()`); they read each Linear's input before it
        runs, so a pass stopped just before a Linear still gives its statistics."""
        self.remove()
        self._handles = [
            m.register_forward_pre_hook(self._hook(n)) for n, m in self._modules.items()
        ]
        return self

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0]
            self.first_input.setdefault(name, x)
            self.calls[name] += 1
            if self._leader is None:
                self._leader = name
            if name == self._leader:
                self._leader_input = x
            shared = self._last is not None and x is self._last[0]
            owner = self.owner.setdefault(name, self._last[1] if shared else name)
            if owner != name:
                if not shared:
                    raise RuntimeError(
                        f"{name} read {owner}'s input tensor in the first batch but not in a "
                        "later one; their Hessians cannot be shared"
                    )
                return
            self._last = (x, name)
            if self._first_step_only and x is not self._leader_input:
                return
            h = self.h.get(name)
            if h is None:
                m = self._modules[name]
                h = torch.zeros(m.in_features, m.in_features, device=m.weight.device)
            n = self.n.get(name, 0)
            if self._float_inputs is not None:
                self._accumulate_cross(name, n, x.detach())
            self.h[name], self.n[name] = accumulate_hessian(h, n, x.detach())

        return hook

    def _accumulate_cross(self, name: str, n: int, x: torch.Tensor) -> None:
        calls = self._float_inputs.get(name, [])
        k = self.calls[name] - 1
        if k >= len(calls) or calls[k].shape != x.shape:
            raise RuntimeError(
                f"{name}'s call {k + 1} has no float-model input of shape {tuple(x.shape)}"
            )
        c = self.c.get(name)
        if c is None:
            c = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        self.c[name] = accumulate_cross(c, n, calls[k].to(x.device) - x, x)

    def hessian(self, name: str) -> torch.Tensor:
        return self.h[self.owner[name]]

    def scale_inputs(self, names: tuple[str, ...], s: torch.Tensor) -> None:
        """The inputs of the Linears `names` became X / s (AWQ folded 1/s into their
        producer): their Hessians become H / (s s^T)."""
        for owner in {self.owner[n] for n in names if n in self.owner}:
            for kept in (self.h, self.c):
                if owner in kept:
                    divide_by_scales_(kept[owner], s)

    def steps(self) -> list[list[str]]:
        """The modules grouped by shared input (q/k/v; gate/up), in the order they ran."""
        return group_by_input(self.first_input, self.first_input)  # insertion: run order

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None


def _divide_inputs(
    float_inputs: dict[str, list[torch.Tensor]], names: tuple[str, ...], s: torch.Tensor
) -> None:
    """The float model's inputs of `names` after AWQ folded 1/s into their producer: X / s
    (new tensors; Linears that read one tensor keep sharing one)."""
    divided: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, X / s)
    for name in names:
        if name not in float_inputs:
            continue
        out = []
        for t in float_inputs[name]:
            if id(t) not in divided:
                divided[id(t)] = (t, t / s.to(t.device, t.dtype))
            out.append(divided[id(t)][1])
        float_inputs[name] = out


def quantize_together(
    weights: list[torch.Tensor], hessian: torch.Tensor, cfg: GPTQConfig
) -> list[QuantizedWeight]:
    """GPTQ for Linears that share one input Hessian and one scheme, as one weight: GPTQ's rows
    are independent given H, so stacking them changes nothing but the number of column steps
    (one pass over the columns for q/k/v instead of three) and of Hessian inversions."""
    if len(weights) == 1:
        return [gptq_quantize(weights[0], hessian, cfg)[0]]
    qw, _loss = gptq_quantize(torch.cat(weights), hessian, cfg, scale_dtype=weights[0].dtype)
    out, start = [], 0
    for w in weights:
        rows = slice(start, start + w.shape[0])
        # Copies: a view would keep (and a checkpoint would save) the whole stacked storage.
        parts = {k: getattr(qw, k)[rows].clone() for k in ("codes", "scales", "zeros")}
        out.append(replace(qw, **parts))
        start += w.shape[0]
    return out


class GPTQ:
    name = "gptq"
    needs_calibration = True
    auto_bfloat16 = True  # "auto" forwards in bfloat16 where fast (quantcore.precision)

    def __init__(
        self,
        block_size: int = 128,
        damp: float = 0.01,
        act_order: bool = True,
        mse: bool = True,
        true_sequential: bool = True,
        awq_scales: bool = True,
        awq_grid: int = 20,
        awq_tokens: int | None = 512,
        refit: bool = True,
        propagate: float = 0.0,
        refit_rounds: int = 1,
        descent_passes: int = 0,
        damp_per_feature: float = 0.7,
        awq_duo: str = "off",
        awq_shared_values: bool = False,
    ):
        # Built once (it checks its options here); each block's scale search reuses it.
        self._awq = AWQ(
            grid=awq_grid,
            clip=False,
            search_tokens=awq_tokens,
            duo_scaling=awq_duo,
            shared_values=awq_shared_values,
            # GPTQ rounds with its own pass, not RTN and a refit: candidates judged by RTN
            # (as measured in bench/results for GPTQ's goals).
            search_fit="rtn",
        )
        if damp_per_feature < 0:
            raise ValueError(f"damp_per_feature must be at least 0, got {damp_per_feature}")
        self.damp_per_feature = damp_per_feature
        if descent_passes < 0:
            raise ValueError(f"descent_passes must be at least 0, got {descent_passes}")
        self.descent_passes = descent_passes
        self.refit = refit
        if refit_rounds < 1:
            raise ValueError(f"refit_rounds must be at least 1, got {refit_rounds}")
        self.refit_rounds = refit_rounds
        if not 0.0 <= propagate <= 1.0:
            raise ValueError(f"propagate must be in [0, 1], got {propagate}")
        self.propagate = propagate
        self.block_size = block_size
        self.damp = damp
        self.act_order = act_order
        self.mse = mse
        self.true_sequential = true_sequential
        self.awq_scales = awq_scales

    def config(self, scheme: QuantScheme, in_features: int, tokens: int) -> GPTQConfig:
        """GPTQ's settings for one Hessian of `in_features` estimated from `tokens` inputs."""
        return GPTQConfig(
            scheme.bits,
            scheme.group_size,
            scheme.symmetric,
            self.block_size,
            data_damp(self.damp, self.damp_per_feature, in_features, tokens),
            self.act_order,
            self.mse,
            self.refit,
            self.refit_rounds,
            self.descent_passes,
        )

    @property
    def wants_float_inputs(self) -> bool:
        """The walker then runs each block's float model alongside (see `walk`)."""
        return self.propagate > 0

    @torch.no_grad()
    def quantize_block(
        self,
        block: nn.Module,
        modules: dict[str, tuple[nn.Linear, QuantScheme]],
        forward: Callable[..., object],
        on_module: ModuleDone,
        float_inputs: dict[str, list[torch.Tensor]] | None = None,
    ) -> dict[str, QuantizedWeight]:
        linears = {n: lin for n, (lin, _) in modules.items()}
        # The first full pass (AWQ's recording pass, when it runs) collects every Hessian of
        # the float block, or with true-sequential those of the first step only, and the order.
        # With the float model's inputs (`propagate`), also each input's cross term C.
        order = _Stats(linears, self.true_sequential, float_inputs)
        if self.awq_scales:
            # AWQ's activation-aware channel scales, folded into the producing norm or Linear
            # (the float block is unchanged); GPTQ then rounds the scaled weights, whose
            # inputs are X / s: their Hessian is H / (s s^T), no pass needed to collect it.
            groups, scales, _ = self._awq.scale_block(
                block, modules, forward, watch=lambda: order.attach().remove, keep_inputs=False
            )
            for g, s in zip(groups, scales, strict=True):
                if s is not None:
                    order.scale_inputs(g.members, s)
                    if float_inputs is not None:
                        _divide_inputs(float_inputs, g.members, s)
        else:
            order.attach()
            try:
                forward()
            finally:
                order.remove()
        missing = [n for n in modules if order.calls[n] == 0]
        if missing:
            raise RuntimeError(f"{missing[0]} saw no calibration input; it is never called")
        steps = order.steps() if self.true_sequential else [list(modules)]
        out: dict[str, QuantizedWeight] = {}
        stats = order  # the first step's Hessians come from the full pass
        for k, step in enumerate(steps):
            if k:
                # Later steps see the inputs the quantized earlier steps give them. Only the
                # Hessians' owners are watched (the others read the same tensor), and the
                # pass stops as soon as they have their inputs: none of the step runs.
                owners = {n: linears[n] for n in step if order.owner[n] == n}
                stats = _Stats(owners, float_inputs=float_inputs).attach()
                try:
                    forward(stop_after=list(owners.values()))
                finally:
                    stats.remove()
            # Linears of a step that share one Hessian (one input), one scheme and one dtype
            # are quantized as one weight. A true-sequential step shares one input; without
            # true-sequential the one step holds every Linear, whatever it reads.
            together: dict[tuple, list[str]] = {}
            for name in step:
                lin, scheme = modules[name]
                key = (order.owner[name], scheme, lin.weight.dtype)
                together.setdefault(key, []).append(name)
            for (owner, scheme, _dtype), names in together.items():
                weights = [linears[n].weight.data for n in names]
                hessian = stats.h[owner]
                cfg = self.config(scheme, hessian.shape[0], stats.n[owner])
                if owner in stats.c:
                    # Aim at what the float model computes from its own inputs.
                    weights = [
                        propagation_target(w, hessian, stats.c[owner], self.propagate, cfg.damp)
                        for w in weights
                    ]
                qws = quantize_together(weights, hessian, cfg)
                for name, qw in zip(names, qws, strict=True):
                    err = install_quantized(linears[name], qw)
                    out[name] = qw
                    on_module(name, qw, err)
            stats.h.clear()  # used: the next step collects its own
            stats.c.clear()
        return out
