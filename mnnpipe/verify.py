"""Fidelity: how close a converted or compressed model's outputs are to its source's.

Shared by convert (torch/ONNX vs .mnn), quantize (fp32 .mnn vs int8 .mnn) and benchmark.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import StepFailed
from .specs import Tolerance


class Fidelity(BaseModel):
    """Agreement of a candidate model with a reference model on the same inputs."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(description="Number of inputs compared.")
    max_abs_error: float = Field(description="Largest |candidate - reference| over all outputs.")
    mean_rel_error: float = Field(description="Mean |c - r| / (|r| + 1e-6), averaged over all elements.")
    cosine: float = Field(description="Cosine similarity of the flattened outputs (worst output).")
    top1_agreement: float | None = Field(None, description="Fraction of samples with the same argmax (classifier outputs).")


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> Fidelity:
    """Compare per-sample outputs. Each element is one sample's output, (classes,) or any shape.

    Outputs with a leading batch dimension of 1 are squeezed so (1, 10) and (10,) compare.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs vs {len(candidate)} candidate outputs")
    ref = np.stack([np.asarray(r, np.float64).reshape(-1) for r in reference])
    cand = np.stack([np.asarray(c, np.float64).reshape(-1) for c in candidate])
    if ref.shape != cand.shape:
        raise StepFailed(f"output shapes differ: reference {list(ref.shape[1:])}, candidate {list(cand.shape[1:])}")
    diff = np.abs(ref - cand)
    denom = np.linalg.norm(ref) * np.linalg.norm(cand)
    # clamped: rounding put identical outputs at 1.0000000000000033
    cosine = float(np.clip(np.dot(ref.ravel(), cand.ravel()) / denom, -1.0, 1.0)) if denom > 0 else float(np.allclose(ref, cand))
    top1 = float((ref.argmax(1) == cand.argmax(1)).mean()) if ref.shape[1] > 1 else None
    return Fidelity(
        samples=len(ref),
        max_abs_error=float(diff.max()) if diff.size else 0.0,
        mean_rel_error=float((diff / (np.abs(ref) + 1e-6)).mean()) if diff.size else 0.0,
        cosine=cosine,
        top1_agreement=top1,
    )


def violations(fid: Fidelity, tol: Tolerance) -> list[str]:
    """Human-readable reasons the fidelity misses the tolerance; empty when it is within."""
    out = []
    if tol.max_abs_error is not None and fid.max_abs_error > tol.max_abs_error:
        out.append(f"max abs error {fid.max_abs_error:.3g} > {tol.max_abs_error:.3g}")
    if fid.cosine < tol.min_cosine:
        out.append(f"cosine {fid.cosine:.6f} < {tol.min_cosine}")
    if fid.top1_agreement is not None and fid.top1_agreement < tol.min_top1_agreement:
        out.append(f"top-1 agreement {fid.top1_agreement:.3f} < {tol.min_top1_agreement}")
    return out


def check(fid: Fidelity, tol: Tolerance, what: str) -> None:
    """Raise StepFailed (exit 1, nothing published) when `fid` is outside `tol`."""
    problems = violations(fid, tol)
    if problems:
        raise StepFailed(f"{what} is outside the tolerance: {'; '.join(problems)} (over {fid.samples} samples)")
