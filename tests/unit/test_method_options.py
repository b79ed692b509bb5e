"""The job spec's method options are the methods' own: names the methods take, with their
defaults, so a job that leaves an option out gets what the library gives (jobs may not import
quantcore, so the defaults are written twice)."""

from __future__ import annotations

import inspect

import pytest

from jobs.spec import AWQOptions, GPTQOptions
from quantcore.methods.awq_method import AWQ
from quantcore.methods.gptq_method import GPTQ


@pytest.mark.parametrize(("options", "method"), [(GPTQOptions, GPTQ), (AWQOptions, AWQ)])
def test_spec_defaults_are_the_methods_defaults(options, method):
    params = inspect.signature(method.__init__).parameters
    defaults = {n: p.default for n, p in params.items() if n != "self"}
    spec = options().model_dump()
    assert set(spec) <= set(defaults), set(spec) - set(defaults)
    assert spec == {n: defaults[n] for n in spec}


def test_spec_forward_dtypes_are_the_pipelines():
    from typing import get_args

    from jobs.spec import CalibrationSpec
    from quantcore.pipeline import Calibration
    from quantcore.precision import FORWARD_DTYPES

    field = CalibrationSpec.model_fields["forward_dtype"]
    assert get_args(field.annotation) == FORWARD_DTYPES
    assert field.default == Calibration().forward_dtype == "auto"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"propagate": 0.5, "true_sequential": False, "propagate_model": False}, "propagate needs"),
        ({"propagate": 0.0, "propagate_model": True}, "propagate_model needs"),
    ],
)
def test_awq_propagation_without_its_parts_is_refused_as_the_method_would(options, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        AWQOptions(**options)
    with pytest.raises(ValueError, match=message):
        AWQ(**options)
