"""The quality gate: limits a job's verification figures must meet before anything is
published. Pure: the spec's `quality_gate` dict and the results dict in, violations out."""

from __future__ import annotations

# (gate key, result key, "max" or "min", what it is, format of a value)
LIMITS = (
    ("max_ppl_increase_pct", "ppl_change_pct", "max", "perplexity increase", "{:.2f}%"),
    ("max_kl", "kl", "max", "KL divergence from the base model", "{:.4g} nats/token"),
    ("min_top1", "top1", "min", "top-1 agreement with the base model", "{:.4f}"),
)


def check_gate(gate: dict | None, results: dict) -> list[str]:
    """One line per violated limit, naming the measured value and the limit; empty when the
    figures pass (or there is no gate). A figure the gate needs but that was not measured
    is a violation too: a gate must never pass by omission."""
    if not gate:
        return []
    violations = []
    for key, figure, kind, label, fmt in LIMITS:
        limit = gate.get(key)
        if limit is None:
            continue
        value = results.get(figure)
        if value is None:
            violations.append(f"{label} was not measured, but {key} is set to {limit}")
            continue
        if (kind == "max" and value > limit) or (kind == "min" and value < limit):
            bound = "at most" if kind == "max" else "at least"
            violations.append(
                f"{label} is {fmt.format(value)}, the gate allows {bound} "
                f"{fmt.format(limit)} ({key})"
            )
    return violations


def gate_message(violations: list[str]) -> str:
    """The failure message of a job that missed its gate."""
    return (
        "quality gate not met: "
        + "; ".join(violations)
        + ". Nothing was published; the figures are in the job's results. Use more bits, a "
        "smaller group size or another method (gptq, awq), or loosen quality_gate."
    )
