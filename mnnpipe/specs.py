"""Shared sub-specs and the base classes every step's Spec and Result derive from.

A step's Spec is the single source of truth for its parameters: the CLI, the KFP component,
the Airflow operator and the JSON schema are all generated from it.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_URI_SCHEMES = ("file://", "s3://")
_MAX_ELEMENTS = 1 << 28  # 256 M elements (1 GiB of fp32): beyond that a declared shape is absurd


class Strict(BaseModel):
    """Frozen, closed model: unknown keys are errors, values cannot change after validation.
    No float field of a spec means anything at NaN or infinity (a range, a scale, a budget)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)


def check_uri(value: str, field: str = "uri") -> str:
    """Accept plain paths, file:// and s3://bucket/key; reject other schemes and '..' segments."""
    if not value or not value.strip():
        raise ValueError(f"{field} must be a non-empty path, file:// or s3:// URI")
    if "://" in value and not value.startswith(_URI_SCHEMES):
        scheme = value.split("://", 1)[0]
        raise ValueError(f"{field} has unsupported scheme '{scheme}://'; expected a path, file:// or s3://")
    if value.startswith("s3://"):
        rest = value[len("s3://") :]
        bucket = rest.split("/", 1)[0]
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"{field} has an invalid S3 bucket name '{bucket}'")
        path = rest[len(bucket) :]
        # S3 keys are literal: "a/./b" or "a//b" is a different object than "a/b" to the
        # server, and some servers refuse them. (A trailing "/" names a prefix.)
        segments = path.strip("/").split("/") if path.strip("/") else []
        if path.startswith("//") or any(seg in (".", "") for seg in segments):
            raise ValueError(f"{field} must not contain '.' or empty ('//') segments in its S3 key (got '{value}')")
    elif value.startswith("file://"):
        host, _, rest = value[len("file://") :].partition("/")
        if host not in ("", "localhost"):
            raise ValueError(f"{field}: file:// URI names host '{host}'; expected file:///absolute/path or file://localhost/absolute/path")
        path = "/" + rest
    else:
        path = value
    if ".." in PurePosixPath(path).parts:
        raise ValueError(f"{field} must not contain '..' path segments (got '{value}')")
    if "\x00" in value:
        raise ValueError(f"{field} must not contain NUL bytes")
    return value


def check_factory(value: str | None) -> str | None:
    """A factory is named `pkg.module:callable`; nothing else is imported."""
    if value is not None and not _FACTORY_RE.match(value):
        raise ValueError(f"factory must look like 'pkg.module:callable', got '{value}'")
    return value


ModelFormat = Literal["auto", "torchscript", "torch-export", "state-dict", "onnx", "mnn", "openvino"]
_EXT_FORMATS = {
    ".pt": "torchscript",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".pt2": "torch-export",
    ".pth": "state-dict",
    ".onnx": "onnx",
    ".mnn": "mnn",
    ".xml": "openvino",  # OpenVINO IR (+ .bin beside it): the benchmark step times it
}


class ModelRef(Strict):
    """A model artifact: where it is, and how to read it."""

    uri: str = Field(description="Path, file:// or s3:// URI of the model file.")
    format: ModelFormat = Field(
        "auto",
        description="torchscript (.pt), torch-export (.pt2), state-dict (.pth, needs `factory`), "
        "onnx, mnn, openvino (.xml IR; benchmark only); `auto` infers it from the file extension.",
    )
    factory: str | None = Field(
        None,
        description="`pkg.module:callable` that builds the architecture a state-dict is loaded into "
        "(e.g. `mnnpipe.models:digits_cnn`). Imported code: name only modules you trust.",
    )
    factory_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for `factory`.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str | None) -> str | None:
        return check_factory(v)

    @model_validator(mode="after")
    def _resolve_format(self) -> ModelRef:
        fmt = self.format
        if fmt == "auto":
            suffix = PurePosixPath(self.uri.split("?", 1)[0]).suffix.lower()
            fmt = _EXT_FORMATS.get(suffix)
            if fmt is None:
                raise ValueError(
                    f"format is 'auto' but the extension of '{self.uri}' is not one of "
                    f"{sorted(_EXT_FORMATS)}; set format explicitly"
                )
            object.__setattr__(self, "format", fmt)
        if fmt == "state-dict" and not self.factory:
            raise ValueError("format 'state-dict' needs `factory` ('pkg.module:callable') to rebuild the model")
        return self

    @property
    def is_torch(self) -> bool:
        return self.format in ("torchscript", "torch-export", "state-dict")


class Preprocess(Strict):
    """How raw samples become model inputs: dst = (src / scale - mean) / std, per channel."""

    size: tuple[int, int] | None = Field(
        None, description="Resize images to (height, width); None keeps the dataset's native size."
    )
    channels: Literal["RGB", "BGR", "GRAY"] = Field("RGB", description="Channel order the model expects.")
    scale: float = Field(255.0, gt=0, description="Raw values are divided by this first (255 for 8-bit images; the digits demo set is delivered as 0-255 too).")
    mean: tuple[float, ...] = Field((0.0,), description="Per-channel mean subtracted after scaling (one value broadcasts).")
    std: tuple[float, ...] = Field((1.0,), description="Per-channel std divided after the mean (one value broadcasts).")
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="Tensor layout the model expects.")

    @field_validator("size")
    @classmethod
    def _size(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not all(1 <= d <= 8192 for d in v):
            raise ValueError(f"size must be two integers in [1, 8192], got {list(v)}")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(s <= 0 for s in v):
            raise ValueError("std values must all be > 0")
        return v

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocess:
        n = 1 if self.channels == "GRAY" else 3
        allowed = "1 value" if n == 1 else f"1 or {n} values"
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, n):
                raise ValueError(f"{name} must have {allowed} for channels '{self.channels}', got {len(getattr(self, name))}")
        return self

    def per_channel(self, name: Literal["mean", "std"]) -> tuple[float, ...]:
        n = 1 if self.channels == "GRAY" else 3
        values = getattr(self, name)
        return values * n if len(values) == 1 else values


DatasetFormat = Literal["image-folder", "npz", "sklearn-digits"]


class DatasetRef(Strict):
    """A labelled (or unlabelled) dataset and the preprocessing that turns it into model inputs."""

    format: DatasetFormat = Field(
        description="image-folder: one sub-folder per class; npz: arrays `x` (and `y`): uint8 images, 2-D features, "
        "or model inputs fed as stored (float tensors of rank 3+, integer token ids kept as integers); "
        "sklearn-digits: the 8x8 handwritten digits shipped with scikit-learn (demo set)."
    )
    uri: str | None = Field(None, description="Folder, .npz or archive URI; not used by sklearn-digits.")
    split: Literal["all", "train", "val", "test"] = Field(
        "all", description="Deterministic split of the data (seeded, stratified): 70% train, 10% val, 20% test."
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many samples (after the split).")
    preprocess: Preprocess = Field(default_factory=Preprocess, description="Preprocessing applied to every sample.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else check_uri(v)

    @model_validator(mode="after")
    def _needs_uri(self) -> DatasetRef:
        if self.format != "sklearn-digits" and not self.uri:
            raise ValueError(f"uri is required for dataset format '{self.format}'")
        return self


class TensorSpec(Strict):
    """One model input: name, static shape, dtype and the range sample values are drawn from."""

    name: str = Field("input", min_length=1, max_length=128, description="Input tensor name.")
    shape: tuple[int, ...] = Field(description="Static shape including the batch dimension, e.g. [1, 3, 224, 224].")
    dtype: Literal["float32", "float64", "int64", "int32", "uint8"] = Field("float32", description="Element type.")
    range: tuple[float, float] = Field((0.0, 1.0), description="[low, high) for random sample inputs.")

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not 1 <= len(v) <= 8:
            raise ValueError(f"shape must have 1 to 8 dimensions, got {len(v)}")
        if any(d < 1 for d in v):  # no cap per dimension: a 1-D audio input has 220,000 samples
            raise ValueError(f"shape dimensions must be >= 1, got {list(v)}")
        n = 1
        for d in v:
            n *= d
        if n > _MAX_ELEMENTS:
            raise ValueError(f"shape {list(v)} has {n} elements; more than {_MAX_ELEMENTS} is not a model input")
        return v

    @field_validator("range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"range must be [low, high) with low < high, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _range_fits_dtype(self) -> TensorSpec:
        """Values drawn from `range` must be representable: no wrap-around, no overflow to inf."""
        import numpy as np

        dtype = np.dtype(self.dtype)
        info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
        high = float(info.max) + (1 if dtype.kind in "iu" else 0)  # exclusive for integers
        if not (float(info.min) <= self.range[0] and self.range[1] <= high):
            raise ValueError(f"range {list(self.range)} does not fit dtype {self.dtype} ([{info.min}, {info.max}])")
        return self


# What a spec may ask a step to hold in memory as sample inputs it generates (random or timing
# inputs): far beyond any verification or benchmark need, well below a worker's memory.
SAMPLE_MAX_BYTES = 4 * 2**30


def tensor_bytes(t: TensorSpec, batch: int | None = None) -> int:
    """Bytes of one tensor of `t`'s shape and dtype; `batch` replaces the batch dimension."""
    import numpy as np

    n = batch if batch is not None else t.shape[0]
    for d in t.shape[1:]:
        n *= d
    return n * np.dtype(t.dtype).itemsize


def check_sample_memory(total: int, what: str) -> None:
    """Refuse a spec whose declared sample inputs need more than SAMPLE_MAX_BYTES; `what` names
    the fields and how they multiply, e.g. 'num_samples (4096) x inputs (1 GiB each)'."""
    if total > SAMPLE_MAX_BYTES:
        raise ValueError(
            f"{what} need {total / 2**30:.1f} GiB of sample inputs; at most {SAMPLE_MAX_BYTES / 2**30:g} GiB "
            "(lower the count or the shapes)"
        )


OutputKind = Literal["classification", "embedding", "dense", "other"]


class Tolerance(Strict):
    """How close a converted or compressed model must stay to its source."""

    output_kind: OutputKind = Field(
        "classification",
        description="What the model outputs, which picks the agreement the gate checks: classification (logits: "
        "top-1 agreement per sample), embedding (vectors: nearest-neighbour agreement among the samples), dense "
        "(maps [C, H, W]: per-pixel argmax agreement over channels), other (cosine and max abs error only).",
    )
    max_abs_error: float | None = Field(1e-3, ge=0, description="Largest allowed |a-b| over all outputs; None: unchecked.")
    min_cosine: float = Field(0.999, ge=-1, le=1, description="Smallest allowed cosine similarity of flattened outputs.")
    min_top1_agreement: float = Field(
        0.99,
        ge=0,
        le=1,
        description="Smallest allowed agreement for the output kind: samples with equal argmax (classification), "
        "samples with the same nearest neighbour (embedding), pixels with equal argmax (dense); unused for other.",
    )


class TrainingOptions(Strict):
    """Optimisation settings every training step takes (distill's `training`, prune's `finetune`),
    read by `mnnpipe.stepkit.fit_config`. A step's sub-spec derives from it and adds its own."""

    epochs: int = Field(20, ge=1, le=10_000, description="Maximum number of passes over the training split.")
    batch_size: int = Field(64, ge=1, le=65_536, description="Samples per optimisation step.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or sgd (Nesterov momentum 0.9).")
    lr: float = Field(1e-3, gt=0, le=10, description="Initial learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled (adamw) or L2 (sgd) weight decay.")


#: Fields every StepSpec has that the orchestrator, not the user, decides.
ENVELOPE_FIELDS = ("kind", "schema_version", "output")


class StepSpec(Strict):
    """Fields every step spec has. Subclasses add `kind: Literal[...]` and their parameters."""

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Spec schema version.")
    output: str = Field(
        description="Path, file:// or s3:// prefix where the step publishes its artifacts and manifest.json."
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed for every random choice the step makes (sampling, init, shuffling).")

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return check_uri(v, "output")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        # Every step declares `kind: Literal["<step>"]`; document it once here, for all of them.
        super().__pydantic_init_subclass__(**kwargs)
        kind = cls.model_fields.get("kind")
        if kind is not None and not kind.description:
            kind.description = "The step this spec is for (a discriminator: specs of several steps can share one file or union)."
            cls.model_rebuild(force=True)


class Artifact(BaseModel):
    """A published file: where it is and what its bytes are."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(description="Where the artifact was published.")
    sha256: str = Field(description="Hex sha256 of the bytes.")
    size: int = Field(description="Size in bytes.")
    media_type: str = Field("application/octet-stream", description="What the bytes are.")


class StepResult(BaseModel):
    """Fields every step result has: the published artifacts and computed metrics."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: str = Field(description="The step that produced this result.")
    output: str = Field("", description="The prefix the artifacts were published under.")
    artifacts: dict[str, Artifact] = Field(default_factory=dict, description="Published files by role.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Numbers the step measured.")
    cached: bool = Field(False, description="True when served from an earlier identical run.")
    cache_key: str = Field("", description="sha256 of step, spec and input digests.")


# --------------------------------------------------------------------------- shared by every spec


def validation_error_line(error: Any) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) as '<field.path>: <message>'."""
    loc = ".".join(str(p) for p in error["loc"]) or "spec"
    if error["type"] == "extra_forbidden":
        msg = "unknown field (not part of this step's spec)"
    elif error["type"] == "missing":
        msg = "required field is missing"
    else:
        msg = error["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}"


def format_validation_error(e: ValidationError) -> str:
    """The first problem of `e` as one line naming the field, and how many more there are."""
    errors = e.errors(include_url=False)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return validation_error_line(errors[0]) + more


def max_accuracy_drop_field(default: float | None, measured: str, note: str = "") -> Any:
    """The one declaration of a step's accuracy budget, `max_accuracy_drop`: the largest allowed
    drop of top-1 accuracy in percentage points (the gate's `max_drop` is in the same unit).
    Each step names what is compared (`measured`); the field keeps its name and place in the spec."""
    return Field(
        default,
        ge=0,
        le=100,
        description=f"Largest allowed top-1 accuracy drop {measured}, in PERCENTAGE POINTS (0.5: 97.5% -> at least "
        f"97.0%); beyond it the step fails and publishes nothing.{' ' + note if note else ''}",
    )


def accuracy_drop_pp(reference: float, accuracy: float) -> float:
    """How far `accuracy` is below `reference` (both 0-1 fractions), in percentage points."""
    return round((reference - accuracy) * 100, 6)


def exceeds_accuracy_budget(drop_pp: float, max_accuracy_drop: float) -> bool:
    """True when a drop (percentage points) is beyond the budget; a drop at the budget is within it."""
    return drop_pp > max_accuracy_drop + 1e-9


# --------------------------------------------------------------------------- reading Specs by field type


def holds(annotation: Any, cls: type) -> bool:
    """True when a field annotated `annotation` holds a `cls` (itself, or in an Optional/Union)."""
    if annotation is cls:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(holds(arg, cls) for arg in typing.get_args(annotation))
    return False


def list_item_model_field(annotation: Any) -> str | None:
    """For list[X] where X is a pydantic model with a ModelRef field (benchmark's
    `models: list[ModelUnderTest]`): that field's name; else None."""
    if typing.get_origin(annotation) not in (list, tuple):
        return None
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    item = args[0] if len(args) == 1 else None
    return next((name for name, info in getattr(item, "model_fields", {}).items() if holds(info.annotation, ModelRef)), None)


def fields_holding(spec_cls: type[BaseModel], cls: type) -> tuple[str, ...]:
    """The top-level fields of `spec_cls` that hold a `cls` (e.g. every DatasetRef input)."""
    return tuple(f for f, info in spec_cls.model_fields.items() if holds(info.annotation, cls))
