"""JobSpec: what a team submits. Validation errors name the field and the reason."""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class Method(StrEnum):
    rtn = "rtn"
    gptq = "gptq"
    awq = "awq"


# Bit widths with a packed layout and a kernel path (see kernels/packing.py).
METHOD_BITS: dict[Method, tuple[int, ...]] = {m: (2, 3, 4, 8) for m in Method}
GROUP_SIZES = (-1, 32, 64, 128, 256)
CALIBRATION_DATASETS = ("wiki-excerpt",)

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(default="wiki-excerpt", examples=["wiki-excerpt"])
    n_samples: int = Field(default=32, ge=1, le=4096)
    seq_len: int = Field(default=512, ge=16, le=32768)
    seed: int = Field(default=0, ge=0)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in CALIBRATION_DATASETS:
            raise ValueError(f"unknown dataset {v!r}; available: {', '.join(CALIBRATION_DATASETS)}")
        return v


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(default=512, ge=16, le=32768)
    max_windows: int | None = Field(
        default=16, ge=1, description="Evaluate at most this many windows (None: all)."
    )


class GPTQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(default=128, ge=1, le=4096, description="Lazy-update block.")
    damp: float = Field(
        default=0.01, gt=0, le=1, description="Damping, a fraction of the mean Hessian diagonal."
    )
    act_order: bool = Field(
        default=True,
        description="Quantize columns by descending Hessian diagonal; groups stay static "
        "(contiguous), so kernels need no g_idx.",
    )
    mse: bool = Field(default=False, description="Search clipped scales per group (slower).")
    true_sequential: bool = True


class AWQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grid: int = Field(default=20, ge=1, le=100, description="Scale exponents tried in [0, 1].")
    clip: bool = Field(default=True, description="Search a clipped range per group.")
    clip_grid: int = Field(default=20, ge=1, le=100)
    max_shrink: float = Field(default=0.5, gt=0, lt=1, description="Most a range may shrink.")


class JobSpec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "revision": "main",
                    "method": "rtn",
                    "bits": 4,
                    "group_size": 64,
                    "symmetric": False,
                    "calibration": {
                        "dataset": "wiki-excerpt",
                        "n_samples": 32,
                        "seq_len": 512,
                        "seed": 0,
                    },
                }
            ]
        },
    )

    model_id: str = Field(min_length=1, max_length=200, description="Hub id (owner/name).")
    revision: str = Field(default="main", min_length=1, max_length=200)
    method: Method = Method.rtn
    bits: int = 4
    group_size: int = Field(default=128, description="Columns per group; -1 is per-channel.")
    symmetric: bool = False
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    gptq: GPTQOptions | None = Field(default=None, description="Options when method is gptq.")
    awq: AWQOptions | None = Field(default=None, description="Options when method is awq.")

    @field_validator("model_id")
    @classmethod
    def _model_id_shape(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        if not _MODEL_ID.match(v):
            raise ValueError(f"{v!r} is not a Hub model id such as 'owner/name'")
        return v

    @field_validator("bits")
    @classmethod
    def _bits_for_method(cls, v: int, info: ValidationInfo) -> int:
        method = info.data.get("method")
        allowed = METHOD_BITS.get(method, ()) if method else ()
        if method and v not in allowed:
            raise ValueError(
                f"{method.value} cannot produce {v}-bit weights; choose one of "
                f"{', '.join(map(str, allowed))}"
            )
        return v

    @field_validator("gptq", "awq")
    @classmethod
    def _options_for_their_method(cls, v: BaseModel | None, info: ValidationInfo):
        method = info.data.get("method")
        if v is not None and method and method.value != info.field_name:
            raise ValueError(
                f"{info.field_name.upper()} options were given but method is {method.value}"
            )
        return v

    def method_options(self) -> dict:
        """The chosen method's options with their defaults filled in."""
        if self.method == Method.gptq:
            return (self.gptq or GPTQOptions()).model_dump()
        if self.method == Method.awq:
            return (self.awq or AWQOptions()).model_dump()
        return {}

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(
                f"{v} is not a supported group size; choose one of 32, 64, 128, 256 or -1 "
                "(per-channel)"
            )
        return v
