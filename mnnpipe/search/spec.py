"""The search spec: a base recipe, the values to try at dotted paths in it, and how to pick one.

Candidates are generated here, before anything runs, so a bad space fails at once (exit 2,
naming the field) and every orchestrator (local, KFP ParallelFor, Airflow .expand) gets the same
candidates, with the same ids, in the same order.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import re
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal

from pydantic import AfterValidator, Field, PlainValidator, ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import SpecError
from ..specs import Strict

__all__ = [
    "Candidate", "Constraints", "Objective", "Range", "SearchSpec", "Weights",
    "apply_overrides", "candidates", "describe_overrides", "parse_search",
]

#: More values than this in one range is a typo (a step of 0.0001), not a search.
MAX_RANGE_VALUES = 10_000
#: Grid points enumerated at most to count or sample distinct candidates: beyond it a grid is
#: sampled by drawing indices, and the budget check trusts the raw size.
ENUMERATE_LIMIT = 100_000
#: A grid over budget is counted exactly (for the message) up to this many combinations.
_COUNT_LIMIT = 10_000
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class _SpaceError(ValueError):
    """A combination of overrides that cannot be applied; a ValueError so pydantic reports it too."""


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a number, got a boolean")
    return v


class Range(Strict):
    """Numbers low, low+step, low+2*step, ... up to and including high.

    Integers stay integers when low, high and step all are; otherwise the values are floats
    rounded to 12 decimals, so 0.1 + 2 * 0.1 is 0.3 (not 0.30000000000000004) and high is reached
    when it lies on the grid despite rounding in (high - low) / step."""

    low: int | float = Field(description="First value.")
    high: int | float = Field(description="Last value allowed (inclusive).")
    step: int | float = Field(gt=0, description="Distance between values (> 0).")

    @field_validator("low", "high", "step", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        return _no_bool(v)

    @model_validator(mode="after")
    def _bounds(self) -> Range:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        if self._count() > MAX_RANGE_VALUES:
            raise ValueError(f"{self._count()} values from low {self.low} to high {self.high} by step {self.step}; at most {MAX_RANGE_VALUES}")
        return self

    def _count(self) -> int:
        return int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1

    def values(self) -> list[int | float]:
        n = self._count()
        if all(isinstance(v, int) for v in (self.low, self.high, self.step)):
            return [self.low + i * self.step for i in range(n)]
        return [min(round(self.low + i * self.step, 12), float(self.high)) for i in range(n)]


def _check_path(path: str) -> str:
    """Only the syntax: which fields a recipe has is the recipe model's business (the `validate`
    hook of `candidates`), so a new recipe field or section needs no change here."""
    if not all(_SEGMENT.match(p) for p in path.split(".")):
        raise ValueError("not a dotted path of field names (e.g. prune.target.ratio)")
    return path


def _check_json(value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"value {value!r} is not a JSON value ({e})") from None


def _axis(value: Any) -> list[Any] | Range:
    """The values of one path: a non-empty list of JSON values, or a Range given as a mapping."""
    if isinstance(value, Range):
        return value
    if isinstance(value, dict):
        try:
            return Range.model_validate(value)
        except ValidationError as e:
            raise ValueError(f"bad range ({{low, high, step}}): {_format(e)}") from None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("empty list: give at least one value to try")
        for v in value:
            _check_json(v)
        return list(value)
    raise ValueError(f"expected a non-empty list of values or a range {{low, high, step}}, got {type(value).__name__}")


SpacePath = Annotated[str, AfterValidator(_check_path)]
Axis = Annotated[list[Any] | Range, PlainValidator(_axis, json_schema_input_type=list[Any] | Range)]


class Constraints(Strict):
    """What a candidate must meet to be chosen. Every limit is optional (None: unchecked)."""

    max_accuracy_drop: float | None = Field(
        None, ge=0, description="Largest allowed reference accuracy - accuracy, in percentage points of the 0-1 "
        "accuracy (1.0 = 0.01); the reference is the uncompressed source model's accuracy.",
    )
    max_size_bytes: int | None = Field(None, ge=1, description="Largest allowed size of the compressed model file, in bytes.")
    max_latency_ms_p50: float | None = Field(None, gt=0, description="Largest allowed median latency, in milliseconds.")
    min_fidelity: float | None = Field(
        None, ge=0, le=1, description="Smallest allowed cosine similarity of the candidate's outputs to the source model's."
    )


class Weights(Strict):
    """Weights of the `weighted` objective; each metric is min-max normalized over the feasible candidates."""

    size: float = Field(0.0, ge=0, description="Weight of the model size (smaller is better).")
    latency: float = Field(0.0, ge=0, description="Weight of the median latency (lower is better).")
    accuracy: float = Field(0.0, ge=0, description="Weight of the accuracy (higher is better).")

    @model_validator(mode="after")
    def _some(self) -> Weights:
        if self.size == self.latency == self.accuracy == 0:
            raise ValueError("at least one weight must be > 0")
        return self


class Objective(Strict):
    """Which feasible candidate is chosen."""

    kind: Literal["smallest", "fastest", "most-accurate", "weighted"] = Field(
        "smallest",
        description="smallest: least bytes; fastest: lowest median latency; most-accurate: highest accuracy; "
        "weighted: lowest sum of weight x normalized metric. Ties go to the other metrics, then the id.",
    )
    weights: Weights | None = Field(None, description="Weights of size, latency and accuracy; only (and required) for kind 'weighted'.")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: Weights | None, info: ValidationInfo) -> Weights | None:
        kind = info.data.get("kind")
        if kind == "weighted" and v is None:
            raise ValueError("required when kind is 'weighted'")
        if kind != "weighted" and v is not None:
            raise ValueError(f"only used when kind is 'weighted' (kind is '{kind}')")
        return v


class SearchSpec(Strict):
    """A recipe search: candidates are the base recipe with each combination of the space's values."""

    base: dict[str, Any] = Field(
        description="The recipe every candidate starts from (as mnnpipe.recipe reads it: model, one section per step, gate)."
    )
    space: dict[SpacePath, Axis] = Field(
        description="Values to try, by dotted path into the recipe (e.g. prune.target.ratio): a non-empty list of "
        "JSON values, or a range {low, high, step}. A one-segment path (a section, e.g. prune) with a null value "
        "removes that section (skips the optional step); nothing below a null is set. Which paths exist is checked "
        "when the candidates are validated as recipes.",
    )
    sampling: Literal["grid", "random"] = Field(
        "grid", description="grid: every combination (at most `budget`); random: `budget` distinct combinations drawn with `seed`."
    )
    budget: int = Field(16, ge=1, le=1000, description="Most candidates to run.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of the random sampling.")
    constraints: Constraints = Field(default_factory=Constraints, description="What the chosen candidate must meet.")
    objective: Objective = Field(default_factory=Objective, description="Which feasible candidate is chosen.")

    @field_validator("base")
    @classmethod
    def _base(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_json(v)
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("name at least one path to vary")
        return v

    @model_validator(mode="after")
    def _fits_budget(self) -> SearchSpec:
        _points(self)  # every combination the search will run must apply, and a grid must fit the budget
        return self


class Candidate(Strict):
    """One recipe to run: the base with `overrides` applied."""

    id: str = Field(description="c00, c01, ...: stable across orchestrators for the same spec.")
    overrides: dict[str, Any] = Field(description="The values this candidate sets, by dotted path (those in effect).")
    recipe: dict[str, Any] = Field(description="The complete recipe: the base with the overrides applied.")


def _format(e: ValidationError) -> str:
    """'<field.path>: <message>' for the first error; dict keys count as a path segment ('[key]' dropped)."""
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "[key]")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc + ': ' if loc else ''}{msg}{more}"


def parse_search(data: Any) -> SearchSpec:
    """A SearchSpec from a mapping, JSON/YAML text or a SearchSpec; SpecError names the field."""
    if isinstance(data, SearchSpec):
        return data
    if isinstance(data, str):
        from ..spectext import parse_spec_text

        data = parse_spec_text(data, "search")
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format(e)) from None


def _effective(overrides: dict[str, Any]) -> dict[str, Any]:
    """Drop overrides below a path set to None: null means 'nothing here', so nothing is set inside it."""
    nulls = [p for p, v in overrides.items() if v is None]
    return {p: v for p, v in overrides.items() if not any(p.startswith(n + ".") for n in nulls)}


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with each dotted path set, intermediate mappings created as needed.

    Shorter paths are applied first, so {"prune": {...}} sets a section that "prune.target.ratio"
    then edits, whatever the order of the space. A section (one-segment path) set to None is
    removed, as is a None section of the base: an absent and a null section both skip the step,
    and must not make two candidates look different."""
    recipe = {k: copy.deepcopy(v) for k, v in base.items() if v is not None}
    for path in sorted(overrides, key=lambda p: p.count(".")):
        parts = path.split(".")
        node = recipe
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                inside = ".".join(parts[: i + 1])
                raise _SpaceError(f"space.{path}: cannot set a field inside {inside}, which is a {type(child).__name__} ({json.dumps(child)})")
            node = child
        value = copy.deepcopy(overrides[path])
        if len(parts) == 1 and value is None:
            recipe.pop(path, None)
        else:
            node[parts[-1]] = value
    return recipe


def _describe_value(value: Any) -> str:
    if isinstance(value, dict):
        return "on"  # a whole section switched on (its settings are in the candidate's recipe)
    if value is None:
        return "off"  # a section (or field) removed
    return json.dumps(value, sort_keys=True)


def describe_overrides(overrides: dict[str, Any]) -> str:
    """'prune.target.ratio=0.5, quantize.mode="int8"': how a candidate is named in messages and
    report tables. A whole section given as a value reads `on` and a null `off`
    ('prune.target.ratio=0.5, quantize=on', not the section's every setting); other values as JSON."""
    return ", ".join(f"{p}={_describe_value(v)}" for p, v in overrides.items()) or "the base recipe"


def _axes(spec: SearchSpec) -> list[tuple[str, list[Any]]]:
    return [(path, axis.values() if isinstance(axis, Range) else axis) for path, axis in spec.space.items()]


def _decode(axes: list[tuple[str, list[Any]]], index: int) -> dict[str, Any]:
    """The grid point at `index` in itertools.product order (the last path varies fastest)."""
    picks: dict[str, Any] = {}
    for path, values in reversed(axes):
        index, i = divmod(index, len(values))
        picks[path] = values[i]
    return {path: picks[path] for path, _ in axes}


def _distinct(spec: SearchSpec, axes: list[tuple[str, list[Any]]], indices: Iterable[int]) -> Iterator[tuple[int, dict, dict]]:
    """(index, overrides in effect, recipe) for each index whose recipe was not seen before."""
    seen: set[str] = set()
    for index in indices:
        overrides = _effective(_decode(axes, index))
        recipe = apply_overrides(spec.base, overrides)
        key = json.dumps(recipe, sort_keys=True)
        if key not in seen:
            seen.add(key)
            yield index, overrides, recipe


def _points(spec: SearchSpec) -> list[tuple[dict, dict]]:
    """The (overrides, recipe) pairs the search runs, in grid order; raises for a grid over budget."""
    axes = _axes(spec)
    size = math.prod(len(values) for _, values in axes)
    if spec.sampling == "grid":
        picked = []
        if size <= ENUMERATE_LIMIT:
            picked = list(itertools.islice(_distinct(spec, axes, range(size)), spec.budget + 1))
        if size > ENUMERATE_LIMIT or len(picked) > spec.budget:
            count = f"{sum(1 for _ in _distinct(spec, axes, range(size)))} distinct candidates" if size <= _COUNT_LIMIT else f"{size:,} combinations"
            raise ValueError(
                f"budget: the grid has {count}, more than budget {spec.budget}; "
                "raise budget, narrow the space, or set sampling: random"
            )
    else:
        rng = random.Random(spec.seed)
        if size <= ENUMERATE_LIMIT:
            indices: Iterable[int] = rng.sample(range(size), size)
        else:
            indices = (rng.randrange(size) for _ in range(ENUMERATE_LIMIT))
        picked = sorted(itertools.islice(_distinct(spec, axes, indices), spec.budget), key=lambda point: point[0])
    return [(overrides, recipe) for _, overrides, recipe in picked]


def candidates(spec: SearchSpec, validate: Callable[[dict[str, Any]], Any] | None = None) -> list[Candidate]:
    """The candidates of `spec`, ids c00, c01, ... in grid order (a random sample is kept in grid
    order too). `validate` (e.g. the recipe parser) is called on each recipe; its SpecError is
    raised again naming the candidate and its overrides, so a space that yields a bad recipe is a
    spec error (exit 2) before any candidate runs."""
    try:
        points = _points(spec)
    except ValueError as e:  # only for a spec built without validation (model_construct)
        raise SpecError(str(e)) from None
    width = max(2, len(str(len(points) - 1)))
    out = []
    for n, (overrides, recipe) in enumerate(points):
        cid = f"c{n:0{width}d}"
        if validate is not None:
            try:
                validate(copy.deepcopy(recipe))
            except SpecError as e:
                raise SpecError(f"space: candidate {cid} ({describe_overrides(overrides)}) is invalid: {e}") from None
        out.append(Candidate(id=cid, overrides=overrides, recipe=recipe))
    return out
