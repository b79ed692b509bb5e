"""The walker, perplexity and data on the tiny trained Llama (no service involved)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantcore.data import wiki_excerpt
from quantcore.data.datasets import calibration_samples, evaluation_tokens
from quantcore.errors import CancelledError, ModelNotFoundError, UnsupportedModelError
from quantcore.eval.perplexity import perplexity
from quantcore.methods.base import QuantScheme, SchemeMap
from quantcore.methods.rtn import quantize_rtn
from quantcore.methods.rtn_method import RTN
from quantcore.models.hub import resolve_snapshot
from quantcore.models.loading import decoder_layers
from quantcore.walker import quantize_model


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_corpus_split_is_disjoint_and_stable():
    cal = {a.title for a in wiki_excerpt.calibration_articles()}
    ev = {a.title for a in wiki_excerpt.evaluation_articles()}
    assert not cal & ev
    assert len(cal) > 50 and len(ev) > 15
    assert all(len(a.text) >= wiki_excerpt.MIN_CHARS for a in wiki_excerpt.articles())
    assert not any("[[" in a.text or "{{" in a.text for a in wiki_excerpt.articles())


def test_calibration_is_seeded_and_never_evaluation_text(tokenizer):
    a = calibration_samples(tokenizer, "wiki-excerpt", 4, 64, seed=1)
    assert torch.equal(a, calibration_samples(tokenizer, "wiki-excerpt", 4, 64, seed=1))
    assert not torch.equal(a, calibration_samples(tokenizer, "wiki-excerpt", 4, 64, seed=2))
    ev_text = "\n\n".join(x.text for x in wiki_excerpt.evaluation_articles())
    for row in a:
        assert tokenizer.decode(row[8:40]) not in ev_text


@torch.no_grad()
def test_perplexity_matches_the_models_own_loss(model, tokenizer):
    tokens = evaluation_tokens(tokenizer)
    ours = perplexity(model, tokens, 64, max_windows=3)
    losses = [
        model(
            input_ids=tokens[:, i * 64 : (i + 1) * 64], labels=tokens[:, i * 64 : (i + 1) * 64]
        ).loss
        for i in range(3)
    ]
    assert ours.windows == 3 and ours.tokens == 3 * 63
    assert ours.ppl == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5)


def test_walker_quantizes_every_block_linear(model, tokenizer):
    original = {n: p.clone() for n, p in model.named_parameters()}
    samples = calibration_samples(tokenizer, "wiki-excerpt", 4, 64, seed=0)
    modules, layers = [], []
    ran = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *_: ran.append(1))
    q = quantize_model(
        model,
        samples,
        RTN(),
        SchemeMap(QuantScheme(4, 32, False)),
        on_module=modules.append,
        on_layer=layers.append,
    )
    handle.remove()
    assert ran == []  # not even the embeddings
    prefix, blocks = decoder_layers(model)
    assert prefix == "model.layers" and len(q) == 7 * len(blocks) == len(modules)
    assert [e.layer for e in layers] == [1, 2] and all(e.num_layers == 2 for e in layers)
    # RTN is data-free: no block ran, so no output error is claimed.
    assert all(e.output_error is None for e in layers)
    assert all(0 < e.error < 0.1 for e in modules)
    for name, qw in q.items():
        w = original[f"{name}.weight"]
        expected = quantize_rtn(w, 4, 32, False).dequantize()
        assert torch.equal(dict(model.named_parameters())[f"{name}.weight"], expected)
        assert torch.equal(qw.dequantize(), expected)
    # Ignored and non-block weights are untouched.
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])


def test_overrides_and_ignore(model, tokenizer):
    samples = calibration_samples(tokenizer, "wiki-excerpt", 2, 32, seed=0)
    schemes = SchemeMap(
        QuantScheme(4, 32, False),
        overrides=((r"mlp\.down_proj", QuantScheme(8, -1, True)),),
        ignore=("lm_head", r"layers\.1\.self_attn"),
    )
    q = quantize_model(model, samples, RTN(), schemes)
    assert q["model.layers.0.mlp.down_proj"].bits == 8
    assert q["model.layers.0.mlp.up_proj"].bits == 4
    assert not any(k.startswith("model.layers.1.self_attn") for k in q)


def test_cancellation_stops_between_layers(model, tokenizer):
    samples = calibration_samples(tokenizer, "wiki-excerpt", 2, 32, seed=0)
    layers = []
    with pytest.raises(CancelledError, match="before layer 2 of 2"):
        quantize_model(
            model,
            samples,
            RTN(),
            SchemeMap(QuantScheme(4, 32, False)),
            on_layer=layers.append,
            should_cancel=lambda: len(layers) >= 1,
        )
    assert len(layers) == 1


def test_unsupported_model_names_what_is_missing():
    with pytest.raises(UnsupportedModelError, match="no ModuleList of decoder blocks"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_missing_local_dir_and_hub_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_snapshot(str(tmp_path))


def test_gptq_is_true_sequential_and_beats_rtn(tiny_model_dir, tokenizer):
    from quantcore.methods.gptq_method import GPTQ

    samples = calibration_samples(tokenizer, "wiki-excerpt", 8, 64, seed=0)
    held_out = calibration_samples(tokenizer, "wiki-excerpt", 8, 64, seed=7)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    class Counting(GPTQ):
        steps: list[list[str]] = []

        def quantize_block(self, block, modules, forward, on_module):
            done: list[str] = []
            self.steps.append([])

            def counted(stop_after=()):
                self.steps[-1].append((len(done), len(stop_after)))
                return forward(stop_after)

            return super().quantize_block(
                block, modules, counted, lambda n, q, e: (done.append(n), on_module(n, q, e))
            )

    errors, layers = {}, []
    for name, method in (("rtn", RTN()), ("gptq", Counting(awq_scales=False))):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        q = quantize_model(
            m, samples, method, SchemeMap(QuantScheme(3, 32, False)), on_layer=layers.append
        )
        assert len(q) == 14
        with torch.no_grad():
            a = base(input_ids=held_out).logits
            b = m(input_ids=held_out).logits
        errors[name] = float((a - b).pow(2).mean())
    # Llama blocks: q/k/v share an input, then o, then gate/up, then down: four steps, each
    # collected after the earlier steps were quantized; after the first (full) pass, each
    # pass stops once the step's input is there (gate/up: at gate_proj, whose input up_proj
    # shares).
    assert Counting.steps == [[(0, 0), (3, 1), (4, 1), (6, 1)]] * 2
    assert errors["gptq"] < errors["rtn"]
    # The first layer's reported output error, against one computed here from the float and
    # the quantized first block on the same inputs (the walker reuses GPTQ's float pass).
    captured = []
    hook = base.model.layers[0].register_forward_pre_hook(
        lambda _m, a, kw: captured.append((a, kw)), with_kwargs=True
    )
    with torch.no_grad():
        base(input_ids=samples, use_cache=False)  # a cache would carry keys between calls
    hook.remove()
    ((args, kwargs),) = captured
    with torch.no_grad():
        ref = base.model.layers[0](*args, **kwargs)
        out = m.model.layers[0](*args, **kwargs)
    ref, out = (t[0] if isinstance(t, tuple) else t for t in (ref, out))
    expected = float((ref - out).pow(2).sum() / ref.pow(2).sum())
    gptq_first = layers[2]  # after RTN's two layers
    assert gptq_first.layer == 1 and gptq_first.output_error is not None
    assert gptq_first.output_error == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("per_feature", [0.0, 2.0])
def test_gptq_without_true_sequential_quantizes_each_input_on_its_own_hessian(
    tiny_model_dir, tokenizer, per_feature
):
    """`true_sequential=False`: one pass of the float block collects every Hessian, and the
    Linears are quantized by shared input (q/k/v; o; gate/up; down), each on its own input's
    Hessian (they were once stacked into one weight whatever they read, and failed).
    With `damp_per_feature`, each Hessian is damped by its width over its token count."""
    from quantcore.methods.gptq import GPTQConfig, accumulate_hessian, gptq_quantize
    from quantcore.methods.gptq_method import GPTQ

    samples = calibration_samples(tokenizer, "wiki-excerpt", 4, 64, seed=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    down = base.model.layers[0].mlp.down_proj
    inputs: list[torch.Tensor] = []
    hook = down.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
    with torch.no_grad():
        for i in range(len(samples)):  # one sequence at a time, as the walker runs
            base(input_ids=samples[i : i + 1], use_cache=False)
    hook.remove()

    passes: list[list[int]] = []

    class Counting(GPTQ):
        def quantize_block(self, block, modules, forward, on_module):
            passes.append([])

            def counted(stop_after=()):
                passes[-1].append(len(stop_after))
                return forward(stop_after)

            return super().quantize_block(block, modules, counted, on_module)

    method = Counting(
        awq_scales=False,
        mse=False,
        refit=False,
        true_sequential=False,
        damp_per_feature=per_feature,
    )
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    q = quantize_model(m, samples, method, SchemeMap(QuantScheme(4, 32, False)))
    assert len(q) == 14
    assert passes == [[0], [0]]  # one full pass per block, none stopped early

    h, n = torch.zeros(down.in_features, down.in_features), 0
    for x in inputs:
        h, n = accumulate_hessian(h, n, x)
    damp = max(0.01, per_feature * down.in_features / n)
    assert n == samples.numel() and (damp > 0.1) == (per_feature > 0)
    cfg = GPTQConfig(4, 32, False, act_order=True, damp=damp)
    expected, _ = gptq_quantize(down.weight.data, h, cfg)
    got = q["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(got.scales, expected.scales)
    # The Hessian's sums run in another order: a code may round the other way, rarely.
    assert float((got.codes == expected.codes).float().mean()) > 0.99
    if per_feature:  # and the damping mattered: the default's codes are not these
        default, _ = gptq_quantize(down.weight.data, h, GPTQConfig(4, 32, False, act_order=True))
        assert float((got.codes == default.codes).float().mean()) < 0.97


@pytest.mark.parametrize(
    ("propagate", "forward_dtype"), [(0.0, None), (0.5, None), (0.0, torch.bfloat16)]
)
def test_killed_run_resumes_bit_identical(
    tiny_model_dir, tokenizer, tmp_path, propagate, forward_dtype
):
    from quantcore.checkpoint import LayerCheckpoint
    from quantcore.methods.gptq_method import GPTQ

    samples = calibration_samples(tokenizer, "wiki-excerpt", 4, 64, seed=0)
    schemes = SchemeMap(QuantScheme(4, 32, False))

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    # GPTQ with its AWQ scales: the folded norms must come back on resume too. With
    # `propagate`, the float model's block inputs are part of what a resume restores.
    straight_model = fresh()
    straight = quantize_model(
        straight_model,
        samples,
        GPTQ(awq_grid=5, propagate=propagate),
        schemes,
        forward_dtype=forward_dtype,
    )

    # First run: stopped after layer 1 (a cancel here; a kill leaves the same files).
    layers: list = []
    with pytest.raises(CancelledError):
        quantize_model(
            fresh(),
            samples,
            GPTQ(awq_grid=5, propagate=propagate),
            schemes,
            on_layer=layers.append,
            should_cancel=lambda: len(layers) >= 1,
            checkpoint=LayerCheckpoint(tmp_path / "ck", "key-a"),
            forward_dtype=forward_dtype,
        )
    assert LayerCheckpoint(tmp_path / "ck", "key-a").layers_done == 1

    # Second run, same request: only layer 2 is quantized, and everything matches bit for bit.
    resumed_layers: list = []
    model = fresh()
    resumed = quantize_model(
        model,
        samples,
        GPTQ(awq_grid=5, propagate=propagate),
        schemes,
        on_layer=resumed_layers.append,
        checkpoint=LayerCheckpoint(tmp_path / "ck", "key-a"),
        forward_dtype=forward_dtype,
    )
    assert [e.layer for e in resumed_layers] == [2]
    assert resumed.keys() == straight.keys()
    for name, qw in straight.items():
        assert torch.equal(resumed[name].codes, qw.codes), name
        assert torch.equal(resumed[name].scales, qw.scales), name
        assert torch.equal(dict(model.named_parameters())[f"{name}.weight"], qw.dequantize())
    original = dict(fresh().named_parameters())
    folded = [
        n
        for n, p in straight_model.named_parameters()
        if "norm" in n and not torch.equal(p, original[n])
    ]
    assert folded  # the AWQ scales went into norms
    for n, p in straight_model.named_parameters():
        assert torch.equal(dict(model.named_parameters())[n], p), n

    # A different request does not reuse the files.
    assert LayerCheckpoint(tmp_path / "ck", "key-b").layers_done == 0


def test_a_stopped_pass_runs_only_up_to_its_modules(tiny_model_dir, tokenizer):
    """forward(stop_after=...) calls those modules (their pre-hooks see their inputs) but
    runs neither the last of them nor anything after it."""
    from quantcore.methods.base import install_quantized
    from quantcore.methods.rtn import quantize_rtn

    samples = calibration_samples(tokenizer, "wiki-excerpt", 4, 32, seed=0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    calls: list[tuple[list[str], list[str]]] = []

    class Probe:
        name, needs_calibration = "probe", True

        def quantize_block(self, block, modules, forward, on_module):
            called: list[str] = []
            ran: list[str] = []
            handles = []
            for n, (lin, _) in modules.items():
                handles.append(lin.register_forward_pre_hook(lambda *_a, n=n: called.append(n)))
                handles.append(lin.register_forward_hook(lambda *_a, n=n: ran.append(n)))
            full = forward()
            calls.append((list(called), list(ran)))
            called.clear()
            ran.clear()
            assert forward(stop_after=[modules["self_attn.o_proj"][0]]) is None
            calls.append((list(called), list(ran)))
            for h in handles:
                h.remove()
            out = {}
            for n, (lin, s) in modules.items():
                out[n] = quantize_rtn(lin.weight.data, s.bits, s.group_size, s.symmetric)
                on_module(n, out[n], install_quantized(lin, out[n]))
            assert len(full) == 1 and full[0].shape[:2] == samples.shape
            return out

    quantize_model(m, samples, Probe(), SchemeMap(QuantScheme(4, 32, False)), batch_size=4)
    (all_called, all_ran), (called, ran) = calls[:2]
    assert all_called == all_ran and all_ran[-1] == "mlp.down_proj"
    assert called == [n for n in all_called if not n.startswith("mlp.")]
    assert called[-1] == "self_attn.o_proj" and ran == called[:-1]


def test_default_gptq_takes_its_first_hessians_from_awqs_recording_pass(
    tiny_model_dir, tokenizer, monkeypatch
):
    """With AWQ scales, GPTQ's first Hessians come from AWQ's recording pass, rescaled by the
    folded scales (the inputs became X / s, so H becomes H / s s^T): one full pass per block,
    and GPTQ uses the Hessian that the scaled block's own inputs give."""
    from quantcore.methods import gptq_method
    from quantcore.methods.awq_method import AWQ
    from quantcore.methods.gptq_method import GPTQ, _Stats

    samples = calibration_samples(tokenizer, "wiki-excerpt", 4, 32, seed=0)
    scheme = SchemeMap(QuantScheme(4, 32, False))

    # One full pass per block: AWQ's recording pass (the fold check re-runs one call).
    method, full = GPTQ(awq_grid=4), [0]
    inner = method.quantize_block

    def counting(block, modules, forward, on_module):
        def counted(stop_after=()):
            full[0] += not stop_after
            return forward(stop_after)

        return inner(block, modules, counted, on_module)

    method.quantize_block = counting
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    quantize_model(m, samples, method, scheme, batch_size=4)
    assert full[0] == len(decoder_layers(m)[1])

    # The Hessian GPTQ uses for q/k/v, against one collected from the scaled float block.
    expected, used, folded = [], [], []
    scale_block, together = AWQ.scale_block, gptq_method.quantize_together

    def checking(self, block, modules, forward, **kw):
        groups, scales, rec = scale_block(self, block, modules, forward, **kw)
        pairs = zip(groups, scales, strict=True)
        folded.append(next(s for g, s in pairs if "self_attn.q_proj" in g.members) is not None)
        stats = _Stats({n: lin for n, (lin, _) in modules.items()}, first_step_only=True)
        stats.attach()
        forward()
        stats.remove()
        expected.append(stats.hessian("self_attn.q_proj"))
        return groups, scales, rec

    def recording(weights, hessian, cfg):
        used.append(hessian.clone())
        return together(weights, hessian, cfg)

    monkeypatch.setattr(AWQ, "scale_block", checking)
    monkeypatch.setattr(gptq_method, "quantize_together", recording)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    quantize_model(m, samples, GPTQ(awq_grid=4), scheme, batch_size=4)
    assert any(folded)  # the rescaling was exercised
    firsts = used[:: len(used) // len(expected)]  # q/k/v is each block's first step
    assert len(firsts) == len(expected) == 2
    for h, want in zip(firsts, expected, strict=True):
        torch.testing.assert_close(h, want, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_linears_reading_one_input_share_one_hessian(model, tokenizer):
    """q/k/v (and gate/up) read one tensor: its Hessian is accumulated once, by the first of
    them, and equals the one computed here from that input."""
    from quantcore.methods.gptq import accumulate_hessian
    from quantcore.methods.gptq_method import _Stats
    from quantcore.models.loading import linear_modules

    block = decoder_layers(model)[1][0]
    linears = linear_modules(block)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        lin.register_forward_hook(lambda _m, a, _o, n=n: seen.setdefault(n, []).append(a[0]))
        for n, lin in linears.items()
    ]
    stats = _Stats(linears).attach()
    samples = calibration_samples(tokenizer, "wiki-excerpt", 4, 32, seed=0)
    for start in (0, 2):  # two batches
        model(input_ids=samples[start : start + 2], use_cache=False)
    stats.remove()
    for h in handles:
        h.remove()
    assert stats.steps() == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    assert sorted(stats.h) == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
    ]
    assert stats.hessian("self_attn.v_proj") is stats.hessian("self_attn.q_proj")
    assert stats.hessian("mlp.up_proj") is stats.hessian("mlp.gate_proj")
    for name in ("self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"):
        h, n = torch.zeros(linears[name].in_features, linears[name].in_features), 0
        for x in seen[name]:
            h, n = accumulate_hessian(h, n, x)
        torch.testing.assert_close(stats.hessian(name), h)


def test_later_passes_replay_what_cannot_have_changed(tiny_model_dir, tokenizer, monkeypatch):
    """Once q/k/v/o are final, GPTQ's later passes (and the walker's last one) replay the
    attention's kept outputs instead of recomputing them; once gate/up are final, theirs. The
    codes and the quantized model are exactly those of a walk that recomputes everything."""
    from contextlib import contextmanager

    from torch import nn

    from quantcore.methods.gptq_method import GPTQ
    from quantcore.replay import FrozenOutputs

    samples = calibration_samples(tokenizer, "wiki-excerpt", 4, 32, seed=0)
    held_out = calibration_samples(tokenizer, "wiki-excerpt", 2, 32, seed=7)
    linear_forward = nn.Linear.forward

    def run() -> tuple[dict, dict, torch.Tensor]:
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        names = {id(mod): n.rsplit(".", 1)[-1] for n, mod in m.named_modules()}
        computed: dict[str, int] = {}

        def counting(self, x):
            computed[names[id(self)]] = computed.get(names[id(self)], 0) + 1
            return linear_forward(self, x)

        monkeypatch.setattr(nn.Linear, "forward", counting)
        scheme = SchemeMap(QuantScheme(4, 32, False))
        q = quantize_model(m, samples, GPTQ(awq_scales=False), scheme, batch_size=2)
        monkeypatch.setattr(nn.Linear, "forward", linear_forward)
        with torch.no_grad():
            logits = m(input_ids=held_out).logits
        return q, computed, logits

    replayed, computed, logits = run()

    @contextmanager
    def never(self, record=True):
        yield

    monkeypatch.setattr(FrozenOutputs, "run", never)
    full, computed_full, logits_full = run()
    # Per block and batch (2 blocks, 2 batches), over GPTQ's passes for q/k/v, o, gate/up and
    # down and the walker's last pass.
    per = {k: v // 4 for k, v in computed.items()}
    per_full = {k: v // 4 for k, v in computed_full.items()}
    attn, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj")
    # Without replay: each pass stops as soon as its step's inputs are there, so each Linear
    # is computed once per pass that goes past it.
    assert per_full == {**dict.fromkeys(attn[:3], 5), "o_proj": 4, **dict.fromkeys(mlp, 3)} | {
        "down_proj": 2
    }
    # With replay, every Linear is computed twice: in the float pass, and once quantized.
    assert per == dict.fromkeys((*attn, *mlp, "down_proj"), 2)
    assert replayed.keys() == full.keys()
    for name, qw in replayed.items():
        assert torch.equal(qw.codes, full[name].codes), name
        assert torch.equal(qw.scales, full[name].scales), name
    assert torch.equal(logits, logits_full)


def test_a_propagating_method_gets_the_float_models_own_inputs(tiny_model_dir, tokenizer):
    """With `propagate`, block 2's Linears get, besides the quantized model's inputs, the
    inputs the float model gives them; block 1 gets none (both models feed it alike), and
    the correction changes the result."""
    from quantcore.methods.gptq_method import GPTQ

    samples = calibration_samples(tokenizer, "wiki-excerpt", 3, 64, seed=0)
    schemes = SchemeMap(QuantScheme(3, 32, False))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected: dict[str, list[torch.Tensor]] = {"self_attn.o_proj": [], "mlp.down_proj": []}
    layer = base.model.layers[1]
    hooks = [
        layer.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, n=n: expected[n].append(a[0].detach().clone())
        )
        for n in expected
    ]
    with torch.no_grad():
        for i in range(samples.shape[0]):
            base(input_ids=samples[i : i + 1], use_cache=False)
    for h in hooks:
        h.remove()

    class Seeing(GPTQ):
        seen: list = []

        def quantize_block(self, block, modules, forward, on_module, float_inputs=None):
            self.seen.append(float_inputs)
            return super().quantize_block(block, modules, forward, on_module, float_inputs)

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with_prop = quantize_model(m, samples, Seeing(awq_scales=False, propagate=0.5), schemes)
    first, second = Seeing.seen
    assert first is None
    for name, calls in expected.items():
        assert len(second[name]) == len(calls) == 3
        for got, want in zip(second[name], calls, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = quantize_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
        samples,
        GPTQ(awq_scales=False),
        schemes,
    )
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(
        with_prop["model.layers.0.mlp.down_proj"].codes, plain["model.layers.0.mlp.down_proj"].codes
    )
    assert not torch.equal(with_prop[name].codes, plain[name].codes)
