"""AWQ: exact folding on the tiny Llama, the scale and clipping searches on small problems
(the clipping against a plainly written brute force), and AWQ against RTN end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantcore import precision
from quantcore.data.datasets import calibration_samples
from quantcore.methods import awq_method
from quantcore.methods.awq import (
    awq_scales,
    clip_ranges,
    clip_weight,
    fake_quantize,
    search_scales,
    weight_means,
)
from quantcore.methods.awq_method import AWQ, _take_positions, fold_scales, search_calls
from quantcore.methods.base import QuantScheme, SchemeMap
from quantcore.methods.rtn import quantize_rtn
from quantcore.methods.rtn_method import RTN
from quantcore.models.loading import decoder_layers, linear_modules
from quantcore.walker import quantize_model

W3G32 = QuantScheme(3, 32, symmetric=False)
W2G32 = QuantScheme(2, 32, symmetric=False)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _fresh(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


# --- folding: the float model is unchanged --------------------------------------------------


def _second_block(tiny_model_dir, tokenizer, samples: int, seed: int):
    """A fresh tiny Llama, calibration ids, its logits on them, its second block and that
    block's Linears at w3 g32."""
    model = _fresh(tiny_model_dir)
    ids = calibration_samples(tokenizer, "wiki-excerpt", samples, 64, seed=seed)
    before = model(input_ids=ids).logits
    block = decoder_layers(model)[1][0]
    modules = {n: (lin, W3G32) for n, lin in linear_modules(block).items()}
    return model, ids, before, block, modules


@torch.no_grad()
def test_searched_scales_fold_exactly_into_norms_and_linears(tiny_model_dir, tokenizer):
    model, ids, before, block, modules = _second_block(tiny_model_dir, tokenizer, 4, 0)
    params = {n: p.clone() for n, p in block.named_parameters()}

    # The block runs inside the whole model: its hooks see it as the walker would run it.
    # Candidates judged by plain RTN: judged by RTN and the refit, o_proj's best exponent on
    # this block is 0 (no fold), and this test is about the folds.
    awq = AWQ(shared_values=True, search_fit="rtn")
    groups, scales, _ = awq.scale_block(
        block, modules, lambda: model(input_ids=ids, use_cache=False)
    )

    found = {g.members: (g.producer, g.fold) for g in groups}
    assert found == {
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): ("input_layernorm", "norm"),
        ("mlp.gate_proj", "mlp.up_proj"): ("post_attention_layernorm", "norm"),
        ("mlp.down_proj",): ("mlp.up_proj", "linear"),
        # Grouped-query attention (4 heads, 2 value heads): two query heads read each value
        # head, and o_proj's scales are tied to fold into v_proj's rows (`shared_values`;
        # without it o_proj has no producer).
        ("self_attn.o_proj",): ("self_attn.v_proj", "linear"),
    }
    assert [g.inspected for g in groups] == [
        "self_attn",
        "self_attn.o_proj",
        "mlp",
        "mlp.down_proj",
    ]
    for g, s in zip(groups, scales, strict=True):
        if g.fold is not None:
            assert 0 < g.alpha <= 1 and s is not None and not torch.allclose(s, torch.ones_like(s))
    # The folds really moved weight between the modules...
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.up_proj.weight"):
        assert not torch.allclose(block.get_parameter(name), params[name])
    o_scales = scales[[g.members for g in groups].index(("self_attn.o_proj",))]
    heads = o_scales.view(2, 2, -1)  # [value head, query head reading it, head_dim]
    assert torch.equal(heads[:, 0], heads[:, 1]) and not torch.equal(heads[0], heads[1])
    # ...and the model computes the same function.
    after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_duo_scales_fold_exactly_too(tiny_model_dir, tokenizer):
    model, ids, before, block, modules = _second_block(tiny_model_dir, tokenizer, 2, 1)
    awq = AWQ(duo_scaling="on")
    groups, scales, _ = awq.scale_block(
        block, modules, lambda: model(input_ids=ids, use_cache=False)
    )
    folded = [g for g in groups if g.fold is not None]
    assert folded and all(g.duo for g in folded if g.alpha == 0)
    assert any(g.duo for g in folded)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="duo_scaling"):
        AWQ(duo_scaling="yes")
    with pytest.raises(ValueError, match="descent_passes"):
        AWQ(descent_passes=-1)


@pytest.mark.parametrize(
    ("members", "producer"),
    [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        (("mlp.down_proj",), "mlp.up_proj"),
    ],
)
@torch.no_grad()
def test_folding_wild_scales_keeps_the_model(tiny_model_dir, tokenizer, members, producer):
    model = _fresh(tiny_model_dir)
    ids = calibration_samples(tokenizer, "wiki-excerpt", 2, 64, seed=3)
    before = model(input_ids=ids).logits
    block = decoder_layers(model)[1][1]
    n = block.get_submodule(members[0]).in_features
    s = torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(0)) * 1.5)
    original = block.get_submodule(producer).weight.clone()
    undo = fold_scales(block, members, producer, s)
    assert not torch.allclose(block.get_submodule(producer).weight, original)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    undo()
    assert torch.equal(block.get_submodule(producer).weight, original)


class OnePlusRMSNorm(torch.nn.Module):
    """Gemma's norm: x / rms(x) * (1 + weight). Dividing its weight by s is not exact; the
    fold must give (1 + weight) / s - 1."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight - 1)
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * (1 + self.weight)


class ShiftedRMSNorm(OnePlusRMSNorm):
    """A norm no fold can keep exact: its output also depends on the mean of its weight."""

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight + self.weight.mean()


def _with_norm(tiny_model_dir, norm_class):
    model = _fresh(tiny_model_dir)
    block = decoder_layers(model)[1][0]
    norm = block.post_attention_layernorm
    block.post_attention_layernorm = norm_class(norm.weight.data.clone(), norm.variance_epsilon)
    return model, block


@torch.no_grad()
def test_one_plus_weight_norms_are_folded_exactly(tiny_model_dir, tokenizer):
    model, block = _with_norm(tiny_model_dir, OnePlusRMSNorm)
    ids = calibration_samples(tokenizer, "wiki-excerpt", 4, 64, seed=0)
    before = model(input_ids=ids).logits
    modules = {n: (lin, W3G32) for n, lin in linear_modules(block).items()}
    norm_weight = block.post_attention_layernorm.weight.clone()

    groups, scales, _ = AWQ().scale_block(
        block, modules, lambda: model(input_ids=ids, use_cache=False)
    )

    mlp = next(g for g in groups if g.members == ("mlp.gate_proj", "mlp.up_proj"))
    assert mlp.producer == "post_attention_layernorm" and mlp.fold == "norm" and mlp.alpha > 0
    s = scales[groups.index(mlp)]
    torch.testing.assert_close(
        block.post_attention_layernorm.weight, (1 + norm_weight) / s - 1, rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_fold_that_changes_the_block_is_undone(tiny_model_dir, tokenizer):
    model, block = _with_norm(tiny_model_dir, ShiftedRMSNorm)
    ids = calibration_samples(tokenizer, "wiki-excerpt", 4, 64, seed=0)
    before = model(input_ids=ids).logits
    modules = {n: (lin, W3G32) for n, lin in linear_modules(block).items()}
    gate_up = block.mlp.gate_proj.weight.clone()

    groups, scales, _ = AWQ().scale_block(
        block, modules, lambda: model(input_ids=ids, use_cache=False)
    )

    mlp = next(g for g in groups if g.members == ("mlp.gate_proj", "mlp.up_proj"))
    assert mlp.producer == "post_attention_layernorm" and mlp.alpha > 0
    assert mlp.fold is None and "undone" in mlp.note
    assert scales[groups.index(mlp)] is None
    assert torch.equal(block.mlp.gate_proj.weight, gate_up)
    # The other groups were still folded, and the model is unchanged.
    assert {g.fold for g in groups} == {"norm", "linear", None}
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("norm_class", [None, ShiftedRMSNorm])
def test_under_bfloat16_forwards_folds_are_checked_in_float32_on_the_first_positions(
    tiny_model_dir, tokenizer, monkeypatch, norm_class
):
    """With a bfloat16 forward dtype the recording pass's outputs cannot tell an exact fold
    from bfloat16's rounding, so the check runs the block in float32, on the first call cut to
    its first positions: exact folds are kept, one that changes the block is still undone.
    (The tiny model's 64 positions are also its hidden size: only the positions are cut.)"""
    monkeypatch.setattr(awq_method, "_CHECK_POSITIONS", 16)
    if norm_class is None:
        model, ids, before, block, modules = _second_block(tiny_model_dir, tokenizer, 2, 0)
    else:
        model, block = _with_norm(tiny_model_dir, norm_class)
        ids = calibration_samples(tokenizer, "wiki-excerpt", 2, 64, seed=0)
        before = model(input_ids=ids).logits
        modules = {n: (lin, W3G32) for n, lin in linear_modules(block).items()}
    seen: list[tuple[int, bool]] = []  # each block call: positions, under autocast
    hook = block.register_forward_pre_hook(
        lambda _m, args: seen.append((args[0].shape[1], torch.is_autocast_enabled("cpu")))
    )

    def forward():
        with precision.module_runs("cpu", torch.float32):
            model(input_ids=ids, use_cache=False)

    try:
        with precision.forward_dtype(torch.bfloat16):
            groups, _, _ = AWQ().scale_block(block, modules, forward)
    finally:
        hook.remove()
    # Recording: one call (two sequences of 64) in bfloat16; then float32 runs of 16 positions.
    assert seen[0] == (64, True)
    assert seen[1:] and set(seen[1:]) == {(16, False)}
    mlp = next(g for g in groups if g.members == ("mlp.gate_proj", "mlp.up_proj"))
    if norm_class is None:
        assert all(g.fold is not None for g in groups if g.producer is not None)
    else:
        assert mlp.fold is None and "undone" in mlp.note
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_a_call_cut_to_its_first_positions():
    """Every dimension as long as the sequence is cut (the input, rotary tables, position ids,
    a mask's rows and columns); a batch or a hidden size of the same length, other sizes and
    flags are not."""
    x, mask, cos = torch.randn(8, 8, 8), torch.randn(8, 1, 8, 8), torch.randn(1, 8, 2)
    call = (
        (x,),
        {
            "position_embeddings": (cos, cos),
            "attention_mask": mask,
            "cache_position": torch.arange(8),
            "position_ids": torch.arange(8)[None],
            "causal": True,
        },
    )
    args = _take_positions(call[0], 8, 3)
    kwargs = _take_positions(call[1], 8, 3)
    assert torch.equal(args[0], x[:, :3])
    assert torch.equal(kwargs["attention_mask"], mask[:, :, :3, :3])
    assert all(torch.equal(t, cos[:, :3]) for t in kwargs["position_embeddings"])
    assert kwargs["cache_position"].tolist() == [0, 1, 2]
    assert kwargs["position_ids"].tolist() == [[0, 1, 2]]
    assert kwargs["causal"] is True


# --- the scale search on fewer tokens -------------------------------------------------------


def test_search_calls_cut_the_first_call_by_sequence():
    x, mask = torch.randn(4, 8, 6), torch.randn(4, 1, 8, 8)
    cos = torch.randn(1, 8, 2)  # batch 1: broadcast over sequences, kept whole
    calls = [((x,), {"position_embeddings": (cos, cos), "attention_mask": mask, "causal": True})]

    ((args, kwargs),) = search_calls(calls, 12)  # 12 tokens: two sequences of 8
    assert torch.equal(args[0], x[:2]) and torch.equal(kwargs["attention_mask"], mask[:2])
    assert kwargs["position_embeddings"][0] is cos and kwargs["causal"] is True
    assert search_calls(calls, None) is calls
    assert search_calls(calls, 32) == calls and search_calls(calls, 1000) == calls
    # Several calls holding fewer tokens than asked: whole calls from the start.
    ones = [((torch.randn(1, 8, 6),), {}) for _ in range(3)]
    assert search_calls(ones, 10) == ones[:2] and search_calls(ones, 8) == ones[:1]
    # A first argument that is not [batch, seq, hidden]: nothing is cut.
    flat = [((torch.randn(8, 6),), {})]
    assert search_calls(flat, 4) is flat


def _search_effort(block, forward, search_tokens):
    """Groups found by AWQ(search_tokens) and how many tokens q_proj processed meanwhile."""
    seen = [0]
    h = block.self_attn.q_proj.register_forward_hook(
        lambda _m, a, _o: seen.__setitem__(0, seen[0] + a[0].shape[0] * a[0].shape[1])
    )
    modules = {n: (lin, W3G32) for n, lin in linear_modules(block).items()}
    try:
        awq = AWQ(grid=6, search_tokens=search_tokens, search_stride=1)  # every exponent
        groups, _, _ = awq.scale_block(block, modules, forward)
    finally:
        h.remove()
    return groups, seen[0]


@torch.no_grad()
def test_a_search_on_the_first_sequences_sees_only_them(tiny_model_dir, tokenizer):
    """Calibration of two sequences, each given twice: the statistics and losses of the first
    two sequences are those of all four, so a search cut to them must find exactly what the
    search on everything finds (a wrongly cut mask or rotary table would not), for half the
    work on the re-runs."""
    half = calibration_samples(tokenizer, "wiki-excerpt", 2, 64, seed=0)
    ids = torch.cat([half, half])
    results = {}
    for tokens in (None, 128):
        model = _fresh(tiny_model_dir)
        block = decoder_layers(model)[1][0]
        forward = lambda m=model: m(input_ids=ids, use_cache=False)  # noqa: E731 - as the walker
        results[tokens] = _search_effort(block, forward, tokens)
    (every, seen_all), (cut, seen_cut) = results[None], results[128]
    assert [g.alpha for g in cut] == [g.alpha for g in every]
    for a, b in zip(cut, every, strict=True):
        torch.testing.assert_close(
            torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-4, atol=0
        )
    assert any(g.alpha for g in every)  # something was searched and folded
    # The reference and the 6 grid re-runs of self_attn saw 2 sequences of 64 tokens, not 4.
    assert seen_cut == seen_all - (1 + 6) * 2 * 64


@torch.no_grad()
def test_a_search_on_the_first_call_takes_its_reference_from_the_recording(
    tiny_model_dir, tokenizer, monkeypatch
):
    """One sequence per call, as the walker runs: a search on the first call alone compares
    against the output the recording pass kept, instead of running the module once more,
    and finds the very losses a recomputed reference gives."""
    from quantcore.methods import awq_method

    ids = calibration_samples(tokenizer, "wiki-excerpt", 3, 64, seed=0)

    def forward(m):
        for i in range(ids.shape[0]):
            m(input_ids=ids[i : i + 1], use_cache=False)

    results = {}
    for kept in (True, False):
        if not kept:  # no call's batch is known: every reference is computed
            monkeypatch.setattr(awq_method, "_batch", lambda call: None)
        model = _fresh(tiny_model_dir)
        block = decoder_layers(model)[1][0]
        results[kept] = _search_effort(block, lambda m=model: forward(m), 64)
    (kept, seen_kept), (computed, seen_computed) = results[True], results[False]
    assert [g.alpha for g in kept] == [g.alpha for g in computed]
    for a, b in zip(kept, computed, strict=True):
        torch.testing.assert_close(
            torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=0
        )
    assert any(g.alpha for g in kept)
    # self_attn's reference run (64 tokens through q_proj) is the one saved.
    assert seen_kept == seen_computed - 64


class _MixingNorm(nn.Module):
    """Two Linears after a norm, and an output that mixes the sequences of a batch (so a
    call cut to fewer sequences gives a different first sequence)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        n = self.norm(x)
        h = self.a(n) * self.b(n)
        return h + h.mean(dim=0, keepdim=True)


class _Outer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mix = _MixingNorm(d)

    def forward(self, x):
        return x + self.mix(x)


@torch.no_grad()
def test_a_module_that_mixes_sequences_is_searched_on_whole_calls():
    torch.manual_seed(0)
    x = torch.randn(6, 16, 32) * torch.linspace(0.1, 4, 32)  # some loud channels
    found = {}
    for tokens in (None, 16):
        torch.manual_seed(1)
        block = _Outer(32)
        modules = {n: (lin, W3G32) for n, lin in linear_modules(block).items()}
        groups, _, _ = AWQ(grid=6, search_tokens=tokens, search_stride=1).scale_block(
            block, modules, lambda b=block: b(x)
        )
        (g,) = groups
        assert g.inspected == "mix" and g.producer == "mix.norm"
        found[tokens] = g.losses
    # Cutting would have changed what `mix` computes: the check noticed, and used all.
    assert found[16] == found[None]


# --- the scale search -----------------------------------------------------------------------


def test_scale_search_protects_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, [3, 17, 40, 41]] *= 30  # a few input channels carry large activations
    w = torch.randn(32, 64, generator=g)
    ref = x @ w.t()

    def loss(candidates):
        return float((x @ candidates[0].t() - ref).pow(2).mean())

    found = search_scales(x.abs().mean(0), [w], [W3G32], loss, grid=20)
    assert len(found.losses) == 20 and found.alphas[0] == 0 and found.alphas[-1] == 1
    # alpha = 0 is plain RTN.
    assert found.losses[0] == loss([fake_quantize(w, W3G32)])
    assert 0 < found.alpha < 1
    best = min(found.losses)
    assert best == found.losses[found.alphas.index(found.alpha)]
    assert best < 0.5 * found.losses[0]
    # The reported loss is what the folded layer really does: inputs X / s, weights Q(W * s).
    s = found.scales
    assert torch.allclose(s, awq_scales(x.abs().mean(0), found.alpha))
    folded = (x / s) @ fake_quantize(w * s, W3G32).t()
    assert float((folded - ref).pow(2).mean()) == pytest.approx(best, rel=1e-4)


def test_a_strided_search_finds_a_smooth_curves_minimum_in_fewer_tries():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    x[:, [5, 9, 33]] *= 20
    w = torch.randn(16, 64, generator=g)
    ref = x @ w.t()
    calls = []

    def loss(candidates):
        calls.append(1)
        return float((x @ candidates[0].t() - ref).pow(2).mean())

    every = search_scales(x.abs().mean(0), [w], [W3G32], loss, grid=20)
    assert len(calls) == 20
    calls.clear()
    strided = search_scales(x.abs().mean(0), [w], [W3G32], loss, grid=20, stride=4)
    # 0, 4, ..., 16, 19, then two at distance 2 from the best, two at distance 1.
    assert len(calls) <= 6 + 2 + 2
    assert strided.alpha == every.alpha and torch.equal(strided.scales, every.scales)
    tried = [i for i, v in enumerate(strided.losses) if v == v]
    assert len(tried) == len(calls)
    assert all(strided.losses[i] == every.losses[i] for i in tried)
    # Not a falling-then-rising curve: the best point tried, never one not tried.
    wavy = iter([5.0, 1.0, 3.0, 0.5, 9.0, 9.0, 2.0, 0.7, 0.2, 8.0])
    odd = search_scales(x.abs().mean(0), [w], [W3G32], lambda _c: next(wavy), grid=10, stride=3)
    tried = {i: v for i, v in enumerate(odd.losses) if v == v}
    assert odd.alpha == odd.alphas[min(tried, key=lambda i: (tried[i], i))]
    with pytest.raises(ValueError, match="stride"):
        search_scales(x.abs().mean(0), [w], [W3G32], loss, grid=10, stride=0)


def test_a_search_with_a_fit_judges_each_alpha_by_that_rounding():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 64, generator=g)
    x[:, [2, 30]] *= 25
    w = torch.randn(16, 64, generator=g)
    ref = x @ w.t()
    given = []

    def fit(i, ws, s):
        given.append((i, ws.clone(), s.clone()))
        return ws.copy_(fake_quantize(ws, W2G32))  # a coarser rounding than the scheme's

    def loss(candidates):
        return float((x @ candidates[0].t() - ref).pow(2).mean())

    found = search_scales(x.abs().mean(0), [w], [W3G32], loss, grid=8, fit=fit)
    assert len(given) == 8
    for k, (i, ws, s) in enumerate(given):
        assert i == 0
        assert torch.equal(s, awq_scales(x.abs().mean(0), found.alphas[k]))
        assert torch.allclose(ws, w * s)
    # Each loss is that of fit's rounding, divided back by s: not the scheme's RTN.
    s = found.scales
    assert found.losses[found.alphas.index(found.alpha)] == pytest.approx(
        loss([fake_quantize(w * s, W2G32) / s]), rel=1e-5
    )
    assert found.losses[0] == loss([fake_quantize(w, W2G32)])
    assert found.losses[0] != loss([fake_quantize(w, W3G32)])


@pytest.mark.parametrize("mode", ["refit", "descent"])
def test_the_search_fit_is_rtn_then_the_refit_on_the_scaled_inputs_hessian(mode):
    from quantcore.methods.awq_method import _scaled_hessian
    from quantcore.methods.gptq import data_damp, descend_codes, divide_by_scales_, refit_scales

    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=g)
    inputs = [torch.randn(2, 40, 128, generator=g) * (torch.rand(128, generator=g) * 4 + 0.1)]
    inputs[0][..., 7] = 0  # an input that never fires: damping revives it in H
    s = torch.rand(128, generator=g) + 0.5
    method = AWQ(search_fit=mode, search_descent=2)
    fit = method._search_fit(_scaled_hessian(inputs, None), [w], [W3G32], torch.float32)
    got = fit(0, w * s, s)
    # Written out: H of X / s, RTN of W * s, the scales refitted (W H precomputed inside).
    h, n = _scaled_hessian(inputs, None)
    h = divide_by_scales_(h, s)
    damp = data_damp(method.damp, method.damp_per_feature, 128, n)
    ws = w * s
    qw = refit_scales(ws, h, quantize_rtn(ws, 3, 32, False, torch.float32), damp)
    if mode == "descent":
        qw = refit_scales(ws, h, descend_codes(ws, h, qw, damp, 2), damp)
    assert torch.allclose(got, qw.dequantize(torch.float32), atol=1e-5)
    plain = quantize_rtn(ws, 3, 32, False, torch.float32).dequantize(torch.float32)
    assert not torch.allclose(got, plain, atol=1e-3)  # the refit moved the scales
    with pytest.raises(ValueError, match="search_fit must be one of"):
        AWQ(search_fit="gptq")


@pytest.mark.parametrize("group_size", [16, 24, -1])
def test_weight_means_match_a_plain_loop(group_size):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 40, generator=g), torch.randn(3, 40, generator=g)
    b[1] = 0  # an all-zero row counts as zeros
    schemes = [QuantScheme(4, group_size, False)] * 2
    expected = torch.zeros(40)
    for w in (a, b):
        for row in w:
            gs = 40 if group_size == -1 else group_size
            for start in range(0, 40, gs):
                part = row[start : start + gs].abs()
                top = float(part.max())
                for j, v in enumerate(part):
                    expected[start + j] += float(v) / top if top > 0 else 0.0
    torch.testing.assert_close(weight_means([a, b], schemes), expected / 9)
    # A weight that is not quantized does not count.
    torch.testing.assert_close(
        weight_means([a, b], [schemes[0], None]), weight_means([a], schemes[:1])
    )


@pytest.mark.parametrize("duo", ["off", "on"])
def test_scales_of_channels_reading_one_producer_channel_are_tied(duo):
    """Four input channels read two producer channels (0, 1, 0, 1): the scales the search
    returns are equal on 0 and 2 and on 1 and 3 (the means of the untied ones), in both
    families."""
    torch.manual_seed(0)
    x_mean = torch.tensor([0.5, 4.0, 2.0, 1.0])
    w = torch.randn(6, 4)
    reads = torch.tensor([0, 1, 0, 1])

    def loss(candidates):  # the output error on inputs of those means
        return float(((candidates[0] - w) * x_mean).pow(2).sum())

    found = search_scales(x_mean, [w], [QuantScheme(4, -1, False)], loss, 5, duo=duo, reads=reads)
    s = found.scales
    assert torch.equal(s[0], s[2]) and torch.equal(s[1], s[3]) and not torch.equal(s[0], s[1])
    untied = awq_scales(
        x_mean, found.alpha, weight_means([w], [QuantScheme(4, -1, False)]) if found.duo else None
    )
    torch.testing.assert_close(s, untied.view(2, 2).mean(dim=0).repeat(2))
    assert found.alpha > 0


def test_duo_scales_divide_by_the_weights_means():
    x_mean = torch.tensor([0.5, 2.0, 8.0, 1.0])
    w_mean = torch.tensor([0.9, 0.2, 0.5, 0.0])  # the last: a channel whose weights are zero
    for alpha in (0.0, 0.25, 1.0):
        s = awq_scales(x_mean, alpha, w_mean)
        raw = x_mean.pow(alpha) / w_mean.clamp_min(0.9e-6).pow(1 - alpha)
        torch.testing.assert_close(s, raw / torch.sqrt(raw.max() * raw.min()))
        assert bool(torch.isfinite(s).all() and (s > 0).all())
    # alpha 1 ignores the weights.
    torch.testing.assert_close(awq_scales(x_mean, 1.0, w_mean), awq_scales(x_mean, 1.0))


def test_duo_searches_are_never_worse_than_plain_rounding_or_either_family():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 64, generator=g)
    x[:, [2, 30]] *= 25
    w = torch.randn(24, 64, generator=g)
    w[:, 10:20] *= 0.05  # channels with small weights: what the weight half of duo sees
    ref = x @ w.t()

    def loss(candidates):
        return float((x @ candidates[0].t() - ref).pow(2).mean())

    x_mean = x.abs().mean(0)
    off = search_scales(x_mean, [w], [W3G32], loss, grid=20)
    on = search_scales(x_mean, [w], [W3G32], loss, grid=20, duo="on")
    both = search_scales(x_mean, [w], [W3G32], loss, grid=20, duo="both")
    plain = loss([fake_quantize(w, W3G32)])

    def achieved(found):
        folded = (x / found.scales) @ fake_quantize(w * found.scales, W3G32).t()
        return float((folded - ref).pow(2).mean())

    assert not off.duo
    for found in (on, both):
        assert achieved(found) <= plain * (1 + 1e-5)
        if found.duo:
            w_mean = weight_means([w], [W3G32])
            torch.testing.assert_close(found.scales, awq_scales(x_mean, found.alpha, w_mean))
    assert achieved(both) <= min(achieved(off), achieved(on)) * (1 + 1e-5)
    with pytest.raises(ValueError, match="duo"):
        search_scales(x_mean, [w], [W3G32], loss, grid=20, duo="yes")


@pytest.mark.parametrize(
    "scheme",
    [W3G32, QuantScheme(4, 32, True), QuantScheme(3, -1, False), QuantScheme(4, 24, False)],
)
def test_fake_quantize_is_rtn(scheme):
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(2)) * 0.1
    w[3] = 0  # an all-zero row
    for dtype in (torch.float32, torch.bfloat16):
        wd = w.to(dtype)
        expected = quantize_rtn(wd, scheme.bits, scheme.group_size, scheme.symmetric)
        assert torch.equal(fake_quantize(wd, scheme), expected.dequantize(torch.float32))


def test_scales_are_normalised_and_positive():
    x_mean = torch.tensor([0.0, 1e-3, 0.5, 2.0, 40.0])
    for alpha in (0.0, 0.3, 1.0):
        s = awq_scales(x_mean, alpha)
        assert bool((s > 0).all())
        assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(awq_scales(x_mean, 0.0), torch.ones(5))


# --- the clipping search against a brute force ----------------------------------------------


def brute_force_clip(w, x, scheme, grid, max_shrink):
    """For each row and group, try every shrink of max|w| and keep the first bound with the
    smallest error of that group's part of the output; returns bounds and the rounded weight."""
    out_f, in_f = w.shape
    gs = scheme.group_size
    bounds = torch.empty(out_f, in_f // gs)
    rounded = torch.empty(out_f, in_f)
    for o in range(out_f):
        for g in range(in_f // gs):
            cols = slice(g * gs, (g + 1) * gs)
            row, xs = w[o, cols], x[:, cols]
            best = None
            for i in range(int(max_shrink * grid)):
                # In fp32, as the search: the clipped maximum of a symmetric group sits on a
                # rounding tie, so the bound's last bit decides its code.
                m = row.abs().max() * (1 - i / grid)
                clipped = row.clamp(-m, m)
                q = quantize_rtn(clipped[None, :], scheme.bits, gs, scheme.symmetric)
                q = q.dequantize(torch.float32)[0]
                err = sum(float(xs[t] @ (row - q)) ** 2 for t in range(xs.shape[0]))
                if best is None or err < best[0]:
                    best = (err, m, q)
            bounds[o, g], rounded[o, cols] = float(best[1]), best[2]
    return bounds, rounded


@pytest.mark.parametrize("scheme", [QuantScheme(2, 4, False), QuantScheme(3, 4, True)])
def test_clip_search_matches_brute_force(scheme):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 12, generator=g)
    w[0, 1], w[2, 6], w[4, 11] = 4.0, -5.0, 3.5  # outlier weights are worth clipping
    x = torch.randn(30, 12, generator=g)
    bounds = clip_ranges(w, x, scheme, grid=20, max_shrink=0.5)
    expected_bounds, expected = brute_force_clip(w, x, scheme, 20, 0.5)
    torch.testing.assert_close(bounds, expected_bounds, rtol=1e-6, atol=0)
    assert bool((bounds < w.abs().reshape(5, 3, 4).amax(-1) - 1e-6).any()), "nothing clipped"
    # Rounding the clipped weight gives the brute force's choice, scales from the clipped range.
    qw = quantize_rtn(clip_weight(w, bounds, scheme.group_size), scheme.bits, 4, scheme.symmetric)
    torch.testing.assert_close(qw.dequantize(torch.float32), expected, rtol=0, atol=1e-6)
    plain = quantize_rtn(w, scheme.bits, 4, scheme.symmetric)
    assert bool((qw.scales <= plain.scales).all()) and bool((qw.scales < plain.scales).any())


# --- end to end -----------------------------------------------------------------------------


def test_awq_beats_rtn_through_the_walker(tiny_model_dir, tokenizer):
    samples = calibration_samples(tokenizer, "wiki-excerpt", 8, 64, seed=0)
    held_out = calibration_samples(tokenizer, "wiki-excerpt", 8, 64, seed=7)
    with torch.no_grad():
        reference = _fresh(tiny_model_dir)(input_ids=held_out).logits

    errors, results, events = {}, {}, {}
    layers: dict[str, list] = {}
    # The ablations fit every Linear on the float block's inputs, aimed at its weights
    # (not true-sequential, no propagation), so that each differs from the next in one step.
    on_float = {"true_sequential": False, "propagate": 0.0, "propagate_model": False}
    methods = (
        ("rtn", RTN()),
        ("awq", AWQ()),
        ("awq-float", AWQ(**on_float)),
        ("awq-nodescent", AWQ(descent_passes=0, **on_float)),
        ("awq-norefit", AWQ(refit=False, descent_passes=0, **on_float)),
        ("awq-noclip", AWQ(clip=False, refit=False, descent_passes=0, **on_float)),
    )
    for name, method in methods:
        model = _fresh(tiny_model_dir)
        events[name], layers[name] = [], []
        q = quantize_model(
            model,
            samples,
            method,
            SchemeMap(W3G32),
            on_module=events[name].append,
            on_layer=layers[name].append,
        )
        assert len(q) == 14 and len(events[name]) == 14
        weights = dict(model.named_parameters())
        for module, qw in q.items():
            assert (qw.bits, qw.group_size, qw.symmetric) == (3, 32, False)
            assert torch.equal(weights[f"{module}.weight"], qw.dequantize())
        with torch.no_grad():
            errors[name] = float((model(input_ids=held_out).logits - reference).pow(2).mean())
        results[name] = q
    assert all(0 < e.error < 0.2 for e in events["awq"])
    assert errors["awq"] < 0.9 * errors["rtn"]

    # Layer 1 sees the same float block in every AWQ run, so the scaled weights match and
    # clipping can only narrow the ranges the stored scales come from.
    layer0 = [k for k in results["awq"] if k.startswith("model.layers.0.")]
    assert len(layer0) == 7
    clipped = [results["awq-norefit"][k].scales for k in layer0]
    unclipped = [results["awq-noclip"][k].scales for k in layer0]
    assert all(bool((a <= b * (1 + 1e-6)).all()) for a, b in zip(clipped, unclipped, strict=True))
    assert sum(int((a < b * (1 - 1e-3)).sum()) for a, b in zip(clipped, unclipped, strict=True))

    # The refit keeps the codes and moves scales so that layer 1's outputs on the calibration
    # inputs come closer to the float block's.
    refit, plain = results["awq-nodescent"], results["awq-norefit"]
    for k in layer0:
        assert torch.equal(refit[k].codes, plain[k].codes), k
    assert all(not torch.equal(refit[k].scales, plain[k].scales) for k in layer0)
    assert layers["awq-nodescent"][0].output_error < 0.95 * layers["awq-norefit"][0].output_error
    assert errors["awq-nodescent"] < errors["awq-norefit"]

    # Coordinate descent moves codes (zero points kept) and brings layer 1's outputs closer
    # still.
    descended = results["awq-float"]
    moved = sum(int((descended[k].codes != refit[k].codes).sum()) for k in layer0)
    assert moved > 0
    for k in layer0:
        assert torch.equal(descended[k].zeros, refit[k].zeros), k
    assert layers["awq-float"][0].output_error < 0.95 * layers["awq-nodescent"][0].output_error
    # Later Linears fitted on what the rounded block feeds them and aimed at the float
    # model's outputs: the held-out logits come closer to the float model's.
    assert errors["awq"] < errors["awq-float"]


class _Stop(Exception):
    pass


def _model_forward(model, ids):
    """A walker-style `forward(stop_after=...)` over the whole tiny model: with `stop_after`,
    the pass ends once those modules are about to run."""

    def forward(stop_after=()):
        seen = set()

        def hook(mod, _args):
            seen.add(id(mod))
            if len(seen) == len(stop_after):
                raise _Stop

        handles = [m.register_forward_pre_hook(hook) for m in stop_after]
        try:
            return model(input_ids=ids, use_cache=False)
        except _Stop:
            return None
        finally:
            for h in handles:
                h.remove()

    return forward


def _io(module, run):
    """The inputs and outputs `module` saw during `run()`, concatenated over calls."""
    xs, ys = [], []

    def keep(_m, args, out) -> None:  # returns None: the output stays as it is
        xs.append(args[0])
        ys.append(out)

    h = module.register_forward_hook(keep)
    try:
        run()
    finally:
        h.remove()
    return torch.cat(xs).flatten(0, -2), torch.cat(ys).flatten(0, -2)


@torch.no_grad()
def test_true_sequential_fits_later_steps_on_what_the_rounded_block_feeds_them(
    tiny_model_dir, tokenizer
):
    """o_proj reads what the rounded q/k/v give it. Fitted on those inputs X~ (true-sequential)
    its rounding error (W - Q) X~ is lower than when fitted on the float block's inputs; aimed
    at the float block's outputs (propagate), Q X~ comes closer to what the float o_proj gave
    on its float inputs. q/k/v, the first step, are the same in all three."""
    # Damped little, so that what each fit minimises is close to the error measured here.
    light = {"damp_per_feature": 0.0, "propagate_model": False}
    variants = {
        "float-inputs": AWQ(true_sequential=False, propagate=0.0, **light),
        "sequential": AWQ(true_sequential=True, propagate=0.0, **light),
        "propagated": AWQ(true_sequential=True, propagate=1.0, **light),
    }
    model, ids, _, block, modules = _second_block(tiny_model_dir, tokenizer, 4, 0)
    _, float_out = _io(block.self_attn.o_proj, lambda: model(input_ids=ids, use_cache=False))
    AWQ().scale_block(block, modules, _model_forward(model, ids))
    scaled_w = block.self_attn.o_proj.weight.float().clone()  # the float weight once folded

    results, inputs_now = {}, {}
    for name, awq in variants.items():
        model, ids, _, block, modules = _second_block(tiny_model_dir, tokenizer, 4, 0)
        for step in ("q_proj", "k_proj", "v_proj"):  # 2 bits: o_proj's X~ far from X
            modules[f"self_attn.{step}"] = (modules[f"self_attn.{step}"][0], W2G32)
        passes = []
        forward = _model_forward(model, ids)

        def counted(stop_after=(), forward=forward, passes=passes):
            passes.append(len(stop_after))
            return forward(stop_after)

        results[name] = awq.quantize_block(block, modules, counted, lambda *_: None)
        inputs_now[name], _ = _io(block.self_attn.o_proj, forward)
        # One recording pass, then (true-sequential) one pass stopped before each later step.
        assert passes == ([0] if name == "float-inputs" else [0, 1, 1, 1])
    for step in ("q_proj", "k_proj", "v_proj"):
        codes = [r[f"self_attn.{step}"].codes for r in results.values()]
        assert all(torch.equal(codes[0], c) for c in codes[1:]), step
    x = inputs_now["sequential"]
    assert torch.equal(x, inputs_now["float-inputs"]) and torch.equal(x, inputs_now["propagated"])
    o = {name: r["self_attn.o_proj"].dequantize(torch.float32) for name, r in results.items()}
    fit = {name: float(((scaled_w - q) @ x.t()).pow(2).sum()) for name, q in o.items()}
    assert fit["sequential"] < 0.97 * fit["float-inputs"]
    aim = {name: float((x @ q.t() - float_out).pow(2).sum()) for name, q in o.items()}
    assert aim["propagated"] < 0.97 * aim["sequential"]
