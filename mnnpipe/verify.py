"""Fidelity: how close a converted or compressed model's outputs are to its source's.

Shared by convert (torch/ONNX vs .mnn), quantize (fp32 .mnn vs int8 .mnn) and benchmark.
The agreement that is gated depends on what the output is (Tolerance.output_kind): an argmax
over a segmentation map or an embedding flips on noise, so those kinds get metrics that fit them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import StepFailed
from .specs import OutputKind, Tolerance

_Z95 = 1.959964  # two-sided 95% normal quantile, for the Wilson bound


class Fidelity(BaseModel):
    """Agreement of a candidate model with a reference model on the same inputs."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(description="Number of inputs compared.")
    output_kind: OutputKind = Field("classification", description="The output kind the agreement was measured for.")
    max_abs_error: float = Field(description="Largest |candidate - reference| over all outputs.")
    mean_rel_error: float = Field(description="Mean |c - r| / (|r| + 1e-6), averaged over all elements.")
    cosine: float = Field(description="Cosine similarity of the flattened outputs (worst output).")
    worst_sample_cosine: float | None = Field(None, description="Smallest cosine of one sample's output with its reference.")
    top1_agreement: float | None = Field(None, description="Fraction of samples with the same argmax (classification).")
    top5_agreement: float | None = Field(None, description="Fraction of samples whose reference argmax is in the candidate's top 5 (classification).")
    neighbour_agreement: float | None = Field(
        None,
        description="Fraction of samples whose nearest other sample (cosine) is the reference's, ties within "
        "0.001 counted as equal (embedding).",
    )
    pixel_agreement: float | None = Field(None, description="Fraction of pixels with the same argmax over channels (dense).")
    mean_iou: float | None = Field(None, description="Mean intersection-over-union of the argmax classes (dense).")
    agreement_units: int = Field(0, description="How many samples (or pixels, for dense) the gated agreement counts.")
    agreement_lower_bound: float | None = Field(
        None, description="95% Wilson lower bound of the gated agreement over agreement_units."
    )


def wilson_lower_bound(rate: float, n: int) -> float:
    """95% lower confidence bound of a proportion `rate` observed over `n` trials (Wilson score)."""
    if n <= 0:
        return 0.0
    z2 = _Z95 * _Z95
    centre = rate + z2 / (2 * n)
    spread = _Z95 * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


def _squeeze_batch(a: np.ndarray) -> np.ndarray:
    return a[0] if a.ndim >= 2 and a.shape[0] == 1 else a


def compare(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], kind: OutputKind = "classification"
) -> Fidelity:
    """Compare per-sample outputs. Each element is one sample's output, (classes,) or any shape.

    Outputs with a leading batch dimension of 1 are squeezed so (1, 10) and (10,) compare; a dense
    output is one sample's map, [C, H, W] (channels first) or [H, W] (one channel).
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs vs {len(candidate)} candidate outputs")
    ref_shaped = [_squeeze_batch(np.asarray(r, np.float64)) for r in reference]
    cand_shaped = [_squeeze_batch(np.asarray(c, np.float64)) for c in candidate]
    ref = np.stack([r.reshape(-1) for r in ref_shaped])
    cand = np.stack([c.reshape(-1) for c in cand_shaped])
    if ref.shape != cand.shape:
        raise StepFailed(f"output shapes differ: reference {list(ref.shape[1:])}, candidate {list(cand.shape[1:])}")
    diff = np.abs(ref - cand)
    denom = np.linalg.norm(ref) * np.linalg.norm(cand)
    # clamped: rounding put identical outputs at 1.0000000000000033
    cosine = float(np.clip(np.dot(ref.ravel(), cand.ravel()) / denom, -1.0, 1.0)) if denom > 0 else float(np.allclose(ref, cand))
    fields: dict = {}
    units, rate = 0, None
    if kind == "classification" and ref.shape[1] > 1:
        top1 = ref.argmax(1) == cand.argmax(1)
        fields["top1_agreement"] = rate = float(top1.mean())
        units = len(ref)
        if ref.shape[1] > 5:
            top5 = np.argsort(-cand, axis=1)[:, :5]
            fields["top5_agreement"] = float((top5 == ref.argmax(1)[:, None]).any(1).mean())
    elif kind == "embedding":
        fields["worst_sample_cosine"] = _worst_sample_cosine(ref, cand)
        if len(ref) >= 3:  # with two samples each one's nearest neighbour is the other: no information
            fields["neighbour_agreement"] = rate = _neighbour_agreement(ref, cand)
            units = len(ref)
    elif kind == "dense":
        fields["worst_sample_cosine"] = _worst_sample_cosine(ref, cand)
        shape = ref_shaped[0].shape
        if len(shape) >= 2 and shape[0] > 1:  # channels first: the class of each pixel is its argmax
            r_cls = np.stack(ref_shaped).argmax(1)
            c_cls = np.stack(cand_shaped).argmax(1)
            fields["pixel_agreement"] = rate = float((r_cls == c_cls).mean())
            units = int(r_cls.size)
            fields["mean_iou"] = _mean_iou(r_cls, c_cls)
    else:
        fields["worst_sample_cosine"] = _worst_sample_cosine(ref, cand)
    return Fidelity(
        samples=len(ref),
        output_kind=kind,
        max_abs_error=float(diff.max()) if diff.size else 0.0,
        mean_rel_error=float((diff / (np.abs(ref) + 1e-6)).mean()) if diff.size else 0.0,
        cosine=cosine,
        agreement_units=units,
        agreement_lower_bound=None if rate is None else wilson_lower_bound(rate, units),
        **fields,
    )


def _worst_sample_cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    dots = (ref * cand).sum(1)
    per = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.all(np.isclose(ref, cand), axis=1))
    return float(np.clip(per.min(), -1.0, 1.0))


# Two neighbours whose reference cosines differ by less than this are a tie: either is a match
# (the samples of an untrained or narrow embedder sit within 1e-4 of each other).
NEIGHBOUR_TIE = 1e-3


def _similarities(x: np.ndarray) -> np.ndarray:
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim


def _neighbour_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Share of samples whose nearest other sample under the candidate is (within NEIGHBOUR_TIE)
    the nearest under the reference."""
    ref_sim = _similarities(ref)
    chosen = _similarities(cand).argmax(1)
    rows = np.arange(len(ref))
    return float((ref_sim[rows, chosen] >= ref_sim.max(1) - NEIGHBOUR_TIE).mean())


def _mean_iou(ref_cls: np.ndarray, cand_cls: np.ndarray) -> float:
    ious = []
    for c in np.union1d(np.unique(ref_cls), np.unique(cand_cls)):
        r, k = ref_cls == c, cand_cls == c
        ious.append((r & k).sum() / (r | k).sum())
    return float(np.mean(ious))


def worst(fids: Sequence[Fidelity]) -> Fidelity:
    """One Fidelity for several outputs: the worst value of each metric."""
    first = fids[0]
    merged: dict = {"samples": first.samples, "output_kind": first.output_kind}
    for name in ("max_abs_error", "mean_rel_error"):
        merged[name] = max(getattr(f, name) for f in fids)
    for name in ("cosine", "worst_sample_cosine", "top1_agreement", "top5_agreement", "neighbour_agreement",
                 "pixel_agreement", "mean_iou", "agreement_lower_bound"):
        values = [getattr(f, name) for f in fids if getattr(f, name) is not None]
        merged[name] = min(values) if values else None
    merged["agreement_units"] = min((f.agreement_units for f in fids if f.agreement_units), default=0)
    return Fidelity(**merged)


_AGREEMENT = {  # the agreement each output kind is gated on: (Fidelity field, what it counts)
    "classification": ("top1_agreement", "top-1 agreement", "samples"),
    "embedding": ("neighbour_agreement", "nearest-neighbour agreement", "samples"),
    "dense": ("pixel_agreement", "per-pixel agreement", "pixels"),
}


def violations(fid: Fidelity, tol: Tolerance) -> list[str]:
    """Human-readable reasons the fidelity misses the tolerance; empty when it is within."""
    out = []
    # Written as `not (value within bound)` so that NaN (inf or NaN outputs) fails, never passes.
    if tol.max_abs_error is not None and not fid.max_abs_error <= tol.max_abs_error:
        out.append(f"max abs error {fid.max_abs_error:.3g} > {tol.max_abs_error:.3g}")
    if not fid.cosine >= tol.min_cosine:
        out.append(f"cosine {fid.cosine:.6f} < {tol.min_cosine}")
    if fid.output_kind in _AGREEMENT:
        field, label, unit = _AGREEMENT[fid.output_kind]
        value = getattr(fid, field)
        if value is not None and not value >= tol.min_top1_agreement:
            allowed = math.floor(fid.agreement_units * (1 - tol.min_top1_agreement) + 1e-9)
            out.append(
                f"{label} {value:.4f} < {tol.min_top1_agreement} "
                f"(at most {allowed} of {fid.agreement_units} {unit} may differ at this count)"
            )
    return out


def describe(fid: Fidelity) -> str:
    """Every metric measured, on one line (failures show all of them, not only the one that failed)."""
    parts = [f"cosine {fid.cosine:.6f}"]
    if fid.worst_sample_cosine is not None:
        parts.append(f"worst sample cosine {fid.worst_sample_cosine:.6f}")
    parts += [f"max abs error {fid.max_abs_error:.3g}", f"mean rel error {fid.mean_rel_error:.3g}"]
    for name, label in (("top1_agreement", "top-1 agreement"), ("top5_agreement", "top-5 agreement"),
                        ("neighbour_agreement", "nearest-neighbour agreement"), ("pixel_agreement", "per-pixel agreement"),
                        ("mean_iou", "mean IoU")):
        value = getattr(fid, name)
        if value is not None:
            parts.append(f"{label} {value:.4f}")
    if fid.agreement_lower_bound is not None:
        parts.append(f"agreement 95% lower bound {fid.agreement_lower_bound:.4f} over {fid.agreement_units}")
    return f"{', '.join(parts)} (output kind {fid.output_kind}, {fid.samples} samples)"


def check(fid: Fidelity, tol: Tolerance, what: str) -> None:
    """Raise StepFailed (exit 1, nothing published) when `fid` is outside `tol`."""
    problems = violations(fid, tol)
    if problems:
        raise StepFailed(f"{what} is outside the tolerance: {'; '.join(problems)}; measured: {describe(fid)}")
