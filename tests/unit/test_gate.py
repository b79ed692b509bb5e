"""The quality gate: each violated limit is named with the measured value and the limit."""

from __future__ import annotations

from jobs.gate import check_gate, gate_message

RESULTS = {"ppl_change_pct": 12.345, "kl": 0.08, "top1": 0.87}


def test_no_gate_or_met_gate_passes():
    assert check_gate(None, RESULTS) == []
    assert check_gate({}, RESULTS) == []
    gate = {"max_ppl_increase_pct": 15, "max_kl": 0.1, "min_top1": 0.85}
    assert check_gate(gate, RESULTS) == []
    # Limits are inclusive.
    assert check_gate({"max_kl": 0.08, "min_top1": 0.87}, RESULTS) == []


def test_each_violation_names_value_and_limit():
    gate = {"max_ppl_increase_pct": 5.0, "max_kl": 0.05, "min_top1": 0.9}
    v = check_gate(gate, RESULTS)
    assert len(v) == 3
    assert "perplexity increase is 12.35%" in v[0] and "at most 5.00%" in v[0]
    assert "KL divergence" in v[1] and "0.08" in v[1] and "0.05" in v[1]
    assert "top-1 agreement" in v[2] and "0.8700" in v[2] and "at least 0.9000" in v[2]
    # Only the violated one when the others pass.
    assert len(check_gate({"max_ppl_increase_pct": 20, "min_top1": 0.9}, RESULTS)) == 1
    msg = gate_message(v)
    assert msg.startswith("quality gate not met") and "Nothing was published" in msg


def test_an_unmeasured_figure_fails_the_gate():
    v = check_gate({"max_kl": 0.1}, {"ppl_change_pct": 1.0})
    assert v == ["KL divergence from the base model was not measured, but max_kl is set to 0.1"]
