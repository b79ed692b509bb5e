"""The pipeline's load-calibrate-quantize phases on the tiny Llama: lazy loading, the request's
overrides and ignore list, resume from a checkpoint with a method that changes floats (AWQ),
and the clear errors for a bad request."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from quantcore.checkpoint import LayerCheckpoint
from quantcore.errors import BadRequestError, CancelledError
from quantcore.methods.base import QuantScheme
from quantcore.pipeline import (
    Calibration,
    Override,
    Progress,
    QuantizeRequest,
    quantize,
    request_key,
    scheme_map,
)

CAL = Calibration(n_samples=4, seq_len=64)


def _req(model_dir: Path, **kw) -> QuantizeRequest:
    base = dict(model_id=str(model_dir), bits=4, group_size=32, calibration=CAL)
    return QuantizeRequest(**{**base, **kw})


def test_overrides_give_mixed_precision(tiny_model_dir):
    req = _req(
        tiny_model_dir,
        overrides=(
            Override(r"layers\.1\.mlp\.down_proj$", skip=True),
            Override(r"down_proj$", bits=8),
            Override(r"self_attn\.[qk]_proj$", group_size=-1, symmetric=True),
        ),
        ignore=("lm_head", r"layers\.0\.self_attn\.o_proj"),
    )
    events: list[Progress] = []
    q = quantize(req, on_progress=events.append, device="cpu")
    got = {k: (qw.bits, qw.group_size, qw.symmetric) for k, qw in q.quantized.items()}
    assert got["model.layers.0.mlp.down_proj"] == (8, 32, False)
    assert got["model.layers.0.mlp.up_proj"] == (4, 32, False)
    assert got["model.layers.1.self_attn.q_proj"] == (4, 64, True)  # per-channel: all 64 columns
    assert "model.layers.1.mlp.down_proj" not in got  # skip: floating point
    assert "model.layers.0.self_attn.o_proj" not in got  # ignored
    assert len(got) == 12 and q.num_layers == 2
    assert [e.done for e in events if e.phase == "quantize" and e.milestone] == [1, 2]
    assert {e.phase for e in events} == {"load", "calibrate", "quantize"}


def test_first_matching_override_wins_and_unset_fields_inherit():
    req = QuantizeRequest(
        "m",
        bits=3,
        group_size=64,
        symmetric=False,
        overrides=(Override("mlp", skip=True), Override("down_proj", bits=8)),
    )
    schemes = scheme_map(req)
    assert schemes.scheme_for("model.layers.0.mlp.down_proj") is None
    assert schemes.scheme_for("model.layers.0.self_attn.o_proj") == QuantScheme(3, 64, False)
    later = scheme_map(QuantizeRequest("m", bits=3, overrides=(Override("o_proj", bits=8),)))
    assert later.scheme_for("x.o_proj") == QuantScheme(8, 128, False)
    assert later.scheme_for("lm_head") is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (Override("down_proj", bits=5), r"overrides\[0\] \('down_proj'\): 5-bit weights"),
        (Override("down_proj(", bits=8), r"overrides\[0\]\.pattern: 'down_proj\(' is not a valid"),
        (Override("x", group_size=0), r"overrides\[0\] \('x'\): group_size must be positive"),
    ],
)
def test_bad_overrides_are_named_before_loading(override, message):
    # The model id does not exist: the request is refused before anything is loaded.
    with pytest.raises(BadRequestError, match=message):
        quantize(QuantizeRequest("no/such-model", overrides=(override,)))


def test_resume_is_bit_identical_with_changed_floats(tiny_model_dir, tmp_path):
    """AWQ folds scales into norms: the checkpoint keeps them, so a resumed run hands back
    the same quantized weights and the same changed floats as an uninterrupted one."""
    req = _req(tiny_model_dir, method="awq", method_options={"grid": 5, "clip_grid": 5})
    straight = quantize(req, device="cpu")
    ck = LayerCheckpoint(tmp_path / "ck", request_key(req))
    layers: list[Progress] = []

    def progress(p: Progress) -> None:
        if p.milestone:
            layers.append(p)

    with pytest.raises(CancelledError):
        quantize(req, progress, should_cancel=lambda: len(layers) >= 1, checkpoint=ck)
    assert LayerCheckpoint(tmp_path / "ck", request_key(req)).layers_done == 1

    resumed_layers: list[Progress] = []
    resumed = quantize(
        req,
        lambda p: resumed_layers.append(p) if p.milestone else None,
        checkpoint=LayerCheckpoint(tmp_path / "ck", request_key(req)),
    )
    assert [p.done for p in resumed_layers] == [2]  # layer 1 came from the checkpoint
    assert resumed.quantized.keys() == straight.quantized.keys()
    for name, qw in straight.quantized.items():
        assert torch.equal(resumed.quantized[name].codes, qw.codes), name
        assert torch.equal(resumed.quantized[name].scales, qw.scales), name
        assert torch.equal(resumed.quantized[name].zeros, qw.zeros), name
    assert resumed.replaced.keys() == straight.replaced.keys()
    assert any(k.startswith("model.layers.0.") for k in straight.replaced)
    for name, t in straight.replaced.items():
        assert torch.equal(resumed.replaced[name], t), name


def test_the_temporary_layer_store_goes_with_the_result(tiny_model_dir):
    q = quantize(_req(tiny_model_dir), device="cpu")
    store = next(iter(q.quantized._where.values()))[0].parent
    assert store.name.startswith("qf-layers-") and store.exists()
    del q
    gc.collect()
    assert not store.exists()
