"""Verification on the tiny trained Llama: lockstep figures equal separate measurements by
the perplexity code, KL/top-1 behave, decode speed and size are reported, cancel works."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantcore.artifact import load_quantized, write_artifact
from quantcore.data.datasets import evaluation_tokens
from quantcore.errors import CancelledError
from quantcore.eval.perplexity import perplexity
from quantcore.eval.verify import lockstep, verify
from tests.unit.test_artifact_writer import rtn_all

SEQ, WINDOWS = 64, 6


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "art"
    q = rtn_all(tiny_model_dir, lambda n: (3, -1, False))
    write_artifact(out, tiny_model_dir, q, {}, ignore=["lm_head"], recipe={})
    tokens = evaluation_tokens(AutoTokenizer.from_pretrained(tiny_model_dir))
    return out, tokens


def test_verify_measures_both_models_in_lockstep(tiny_model_dir, artifact):
    out, tokens = artifact
    seen = []
    v = verify(
        tiny_model_dir, out, tokens, SEQ, WINDOWS, "cpu", on_window=lambda i, n: seen.append(i)
    )
    assert seen == list(range(1, WINDOWS + 1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    quant = load_quantized(out)
    assert v.ppl_base == pytest.approx(perplexity(base, tokens, SEQ, WINDOWS).ppl, rel=1e-6)
    assert v.ppl_quant == pytest.approx(perplexity(quant, tokens, SEQ, WINDOWS).ppl, rel=1e-6)
    assert v.ppl_quant > v.ppl_base and v.ppl_change_pct == pytest.approx(
        100 * (v.ppl_quant / v.ppl_base - 1)
    )
    assert v.kl > 0 and 0.3 < v.top1 < 1.0
    assert (v.eval_windows, v.eval_tokens, v.seq_len) == (WINDOWS, WINDOWS * (SEQ - 1), SEQ)
    assert v.ms_per_token_b1 > 0 and v.tokens_per_s_b8 > 0
    assert v.size_bytes == (out / "model.safetensors").stat().st_size


def test_a_model_against_itself_agrees_fully(tiny_model_dir, artifact):
    _, tokens = artifact
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    m = lockstep(base, base, tokens, SEQ, 2, "cpu")
    assert m.ppl_base == m.ppl_quant and m.top1 == 1.0 and abs(m.kl) < 1e-6


def test_cancel_stops_between_windows(tiny_model_dir, artifact):
    out, tokens = artifact
    seen = []
    with pytest.raises(CancelledError, match="window 2 of 6"):
        verify(
            tiny_model_dir,
            out,
            tokens,
            SEQ,
            WINDOWS,
            "cpu",
            on_window=lambda i, n: seen.append(i),
            should_cancel=lambda: len(seen) >= 2,
        )
    assert seen == [1, 2]
