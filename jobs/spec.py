"""JobSpec: what a team submits. Validation errors name the field and the reason."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)


class Method(StrEnum):
    rtn = "rtn"
    gptq = "gptq"
    awq = "awq"


# Bit widths with a packed layout and a kernel path (see qfkernels/packing.py).
METHOD_BITS: dict[Method, tuple[int, ...]] = {m: (2, 3, 4, 8) for m in Method}
GROUP_SIZES = (-1, 32, 64, 128, 256)
# Built in (offline); Hub datasets by alias (need the network); a file the worker can read;
# a file uploaded through the API (POST /v1/calibration).
BUILTIN_DATASETS = ("wiki-excerpt",)
HUB_DATASETS = ("wikitext2", "c4", "pileval")
CALIBRATION_DATASETS = (*BUILTIN_DATASETS, *HUB_DATASETS, "file", "upload")
PRIORITIES = ("high", "default", "low")
# The dtype of a float32 model's calibration matmuls (quantcore.precision.FORWARD_DTYPES).
ForwardDtype = Literal["auto", "float32", "bfloat16"]
FORWARD_DTYPES: tuple[str, ...] = get_args(ForwardDtype)

_LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        default="wiki-excerpt",
        examples=["wiki-excerpt"],
        description="wiki-excerpt (built in), wikitext2 | c4 | pileval (Hub datasets, need the "
        "network), file (`path` on the worker), upload (`upload_id` from POST /v1/calibration).",
    )
    path: str | None = Field(
        default=None, max_length=1000, description="A .txt or .jsonl file, when dataset is file."
    )
    upload_id: str | None = Field(
        default=None, max_length=64, description="An uploaded file's id, when dataset is upload."
    )
    text_field: str = Field(
        default="text", min_length=1, max_length=100, description="The JSONL key holding text."
    )
    n_samples: int = Field(default=32, ge=1, le=4096)
    seq_len: int = Field(default=512, ge=16, le=32768)
    seed: int = Field(default=0, ge=0)
    forward_dtype: ForwardDtype = Field(
        default="auto",
        description="The dtype a float32 model's calibration passes run their matmuls in; "
        "weights, Hessians and the methods' math stay float32. auto: for GPTQ, bfloat16 where "
        "the worker's device multiplies bfloat16 natively (CUDA sm_80+, CPUs with AVX512-BF16 "
        "or AMX), else float32; for AWQ, float32. A bfloat16 or float16 model runs in its own "
        "dtype.",
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in CALIBRATION_DATASETS:
            raise ValueError(f"unknown dataset {v!r}; available: {', '.join(CALIBRATION_DATASETS)}")
        return v

    @model_validator(mode="after")
    def _source_fields(self) -> CalibrationSpec:
        if self.dataset == "file" and not self.path:
            raise ValueError("dataset 'file' needs a path (a .txt or .jsonl file)")
        if self.dataset == "upload" and not self.upload_id:
            raise ValueError("dataset 'upload' needs an upload_id (from POST /v1/calibration)")
        if self.path and self.dataset != "file":
            raise ValueError(f"path is only used with dataset 'file', not {self.dataset!r}")
        if self.upload_id and self.dataset != "upload":
            raise ValueError(f"upload_id is only used with dataset 'upload', not {self.dataset!r}")
        return self


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(default=512, ge=16, le=32768)
    max_windows: int | None = Field(
        default=16, ge=1, description="Evaluate at most this many windows (None: all)."
    )


# AWQ's scale search, alone or before GPTQ: how many calibration tokens it re-runs modules on.
SearchTokens = Annotated[
    int | None,
    Field(
        ge=1,
        description="Calibration tokens the AWQ scale search re-runs modules on (the first "
        "sequences); null: all of them (slower, rarely different).",
    ),
]


# GPTQ's damping per input feature per calibration token (quantcore.methods.gptq.data_damp).
DAMP_PER_FEATURE = 0.7
# AWQ's defaults for its later Linears (quantcore.methods.awq_method.AWQ): fitted on what the
# rounded block feeds them, aimed half-way at the float model's outputs.
AWQ_TRUE_SEQUENTIAL = True
AWQ_PROPAGATE = 0.5
AWQ_PROPAGATE_MODEL = True
SHARED_VALUES_HELP = (
    "Under grouped-query attention, also scale o_proj (tied over the query heads that read "
    "one value head, folded into v_proj)."
)

DuoScaling = Annotated[
    Literal["off", "on", "both"],
    Field(
        description="AWQ's scales from the activations alone (off), divided by the weights' "
        "group-relative means as AutoAWQ and llm-compressor do (on), or the better of the two "
        "searches (both: twice the tries). On SmolLM2 the three are within seed noise.",
    ),
]

SearchFit = Literal["rtn", "refit", "descent"]


class GPTQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(default=128, ge=1, le=4096, description="Lazy-update block.")
    damp: float = Field(
        default=0.01,
        gt=0,
        le=1,
        description="Damping, a fraction of the mean Hessian diagonal: the least used.",
    )
    damp_per_feature: float = Field(
        default=DAMP_PER_FEATURE,
        ge=0,
        le=100,
        description="Damp each Hessian at least this times its width over its calibration "
        "tokens: thin data (few tokens per input feature) is damped more. 0: `damp` alone.",
    )
    act_order: bool = Field(
        default=True,
        description="Quantize columns by descending Hessian diagonal; groups stay static "
        "(contiguous), so kernels need no g_idx.",
    )
    mse: bool = Field(
        default=True,
        description="Search each group's range for the lowest rounding error instead of "
        "taking min/max (slower, more accurate).",
    )
    true_sequential: bool = True
    awq_scales: bool = Field(
        default=True,
        description="First search AWQ's activation-aware channel scales and fold them into the "
        "producing norm or Linear (the float model is unchanged), then run GPTQ on the scaled "
        "weights. False: plain GPTQ (faster, usually less accurate).",
    )
    awq_grid: int = Field(default=20, ge=2, le=100, description="AWQ scale exponents tried.")
    # GPTQ corrects what the scales leave: 512 tokens do as well as 2048 there
    # (bench/results/gptq-variants-cpu-2core.txt), and AWQ alone keeps 2048.
    awq_tokens: SearchTokens = 512
    awq_duo: DuoScaling = "off"
    awq_shared_values: bool = Field(
        default=False,
        description=SHARED_VALUES_HELP,
    )
    refit: bool = Field(
        default=True,
        description="After GPTQ chose the codes, re-fit each row's group scales to them by "
        "least squares on the input Hessian (GPTQ's own objective; cheap).",
    )
    refit_rounds: int = Field(
        default=1,
        ge=1,
        le=4,
        description="With refit: rounds of GPTQ under the re-fitted scales, each re-fitted "
        "again; every row keeps its round with the lower output error. 2: about 1.3x the "
        "time, KL 1% lower on SmolLM2 (not significant over three seeds).",
    )
    descent_passes: int = Field(
        default=0,
        ge=0,
        le=8,
        description="Passes of coordinate descent on the codes after GPTQ (QuantEase), each "
        "code moved to its best grid point with the others held, then a refit. Lowers the "
        "calibration loss; on SmolLM2 no better held-out (about +7 s a pass).",
    )
    propagate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Correct each Linear toward what the float model computes from its own "
        "inputs (GPTAQ/QEP), this fraction of the full least-squares step; 0: off. Runs the "
        "float model alongside: about 1.5x the time and more memory.",
    )


class AWQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grid: int = Field(default=20, ge=2, le=100, description="Scale exponents tried in [0, 1].")
    search_tokens: SearchTokens = 2048
    search_stride: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Try every n-th exponent, then those around the best (1: all of them).",
    )
    clip: bool = Field(default=True, description="Search a clipped range per group.")
    clip_grid: int = Field(default=20, ge=1, le=100)
    max_shrink: float = Field(default=0.5, gt=0, lt=1, description="Most a range may shrink.")
    refit: bool = Field(
        default=True,
        description="After rounding, re-fit each row's group scales to its codes by least "
        "squares on the scaled inputs' Hessian.",
    )
    damp: float = Field(default=0.01, gt=0, le=1, description="The refit's damping, least.")
    damp_per_feature: float = Field(
        default=DAMP_PER_FEATURE, ge=0, le=100, description="As GPTQ's, for the refit's Hessian."
    )
    duo_scaling: DuoScaling = "off"
    descent_passes: int = Field(
        default=3,
        ge=0,
        le=8,
        description="Passes of coordinate descent on the rounded codes against the scaled "
        "inputs' Hessian (QuantEase), each followed by a refit: rounding to nearest picks "
        "each code alone. 0: off; each pass about +5 s on SmolLM2.",
    )
    true_sequential: bool = Field(
        default=AWQ_TRUE_SEQUENTIAL,
        description="Clip and fit o_proj, gate/up and down_proj on the inputs the block gives "
        "them once the Linears before them are rounded (one stopped pass each).",
    )
    propagate: float = Field(
        default=AWQ_PROPAGATE,
        ge=0,
        le=1,
        description="Aim every Linear, this fraction of the least-squares step, at what the "
        "float model (propagate_model) or the float block computes from its own inputs "
        "(GPTAQ/QEP); 0: at its float weights. Needs true_sequential or propagate_model.",
    )
    propagate_model: bool = Field(
        default=AWQ_PROPAGATE_MODEL,
        description="Aim at the float model's outputs (the walker runs it alongside: more "
        "memory) rather than the float block's.",
    )
    shared_values: bool = Field(
        default=False,
        description=SHARED_VALUES_HELP,
    )
    search_fit: SearchFit = Field(
        default="refit",
        description="How the scale search rounds each candidate: rtn; refit (then the group "
        "scales fitted on the inputs' Hessian); descent (refit, code descent, refit).",
    )
    search_descent: int = Field(default=1, ge=1, le=8, description="Passes for descent.")

    @model_validator(mode="after")
    def _propagation_needs_its_parts(self) -> AWQOptions:
        if self.propagate and not (self.true_sequential or self.propagate_model):
            raise ValueError("propagate needs true_sequential or propagate_model")
        if self.propagate_model and not self.propagate:
            raise ValueError("propagate_model needs propagate above 0")
        return self


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a regular expression: {e}") from None
    return pattern


class ModuleOverride(BaseModel):
    """A different scheme (or none) for the modules whose name matches `pattern`: mixed
    precision. The first matching override wins."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(
        min_length=1, max_length=500, examples=[r"mlp\.down_proj$"], description="Regex."
    )
    bits: int | None = Field(default=None, description="Default: the job's bits.")
    group_size: int | None = Field(default=None, description="Default: the job's group size.")
    symmetric: bool | None = None
    skip: bool = Field(default=False, description="Leave matching modules in floating point.")

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, v: str) -> str:
        return _compiles(v)


class QualityGate(BaseModel):
    """Limits the verification figures must meet; otherwise the job fails with reason
    quality_gate and nothing is published."""

    model_config = ConfigDict(extra="forbid")

    max_ppl_increase_pct: float | None = Field(
        default=None, ge=0, examples=[5.0], description="Most perplexity may rise, in percent."
    )
    max_kl: float | None = Field(
        default=None, ge=0, description="Most mean KL divergence (nats/token) from the base."
    )
    min_top1: float | None = Field(
        default=None, ge=0, le=1, description="Least top-1 agreement with the base model."
    )


class Destination(BaseModel):
    """Where the artifact is published. The Hub token is a named secret the worker resolves;
    it is never part of a job."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "hub"] = "local"
    repo_id: str | None = Field(
        default=None,
        max_length=200,
        description="owner/name; default {namespace}/{model}-{method}-w{bits}g{group}.",
    )
    namespace: str | None = Field(default=None, max_length=100)
    branch: str = Field(default="main", min_length=1, max_length=200)
    private: bool = True
    token_secret: str = Field(
        default="hub-token",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=100,
        description="Name of the secret holding the Hub token (never the token itself).",
    )

    @field_validator("repo_id")
    @classmethod
    def _repo_id_shape(cls, v: str | None) -> str | None:
        if v is not None and not (_MODEL_ID.match(v) and "/" in v):
            raise ValueError(f"{v!r} is not a Hub repo id such as 'owner/name'")
        return v

    @model_validator(mode="after")
    def _hub_needs_a_name(self) -> Destination:
        if self.kind == "hub" and not (self.repo_id or self.namespace):
            raise ValueError("a hub destination needs repo_id or namespace")
        return self


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
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=100,
        description="Regexes of modules left in floating point (embeddings always are).",
    )
    overrides: list[ModuleOverride] = Field(default_factory=list, max_length=100)
    quality_gate: QualityGate | None = None
    destination: Destination = Field(default_factory=Destination)
    priority: Literal["high", "default", "low"] = "default"
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    callback_url: str | None = Field(
        default=None,
        max_length=2000,
        pattern=r"^https?://[^\s/?#]+[^\s]*$",
        examples=["https://ci.example.com/hooks/quantfoundry"],
        description="POSTed when the job ends (succeeded, failed, cancelled), signed per "
        "Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature headers).",
    )

    @field_validator("ignore")
    @classmethod
    def _ignore_patterns(cls, v: list[str]) -> list[str]:
        return [_compiles(p) for p in v]

    @field_validator("labels")
    @classmethod
    def _label_shape(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f"label key {key!r} must match {_LABEL_KEY.pattern}")
            if len(value) > 200:
                raise ValueError(f"label {key!r}: value longer than 200 characters")
        return v

    @model_validator(mode="after")
    def _override_schemes(self) -> JobSpec:
        allowed = METHOD_BITS[self.method]
        for i, o in enumerate(self.overrides):
            if o.bits is not None and o.bits not in allowed:
                raise ValueError(
                    f"overrides[{i}].bits: {self.method.value} cannot produce {o.bits}-bit "
                    f"weights; choose one of {', '.join(map(str, allowed))}"
                )
            if o.group_size is not None and o.group_size not in GROUP_SIZES:
                raise ValueError(
                    f"overrides[{i}].group_size: {o.group_size} is not a supported group size"
                )
        return self

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
