"""verify: the agreement each output kind is gated on, its confidence bound, and failure messages."""

from __future__ import annotations

import numpy as np
import pytest

from mnnpipe.errors import StepFailed
from mnnpipe.specs import Tolerance
from mnnpipe.verify import check, compare, wilson_lower_bound, worst


def test_wilson_lower_bound_is_wide_at_few_samples_and_tight_at_many():
    assert wilson_lower_bound(1.0, 16) == pytest.approx(0.8064, abs=1e-4)
    assert wilson_lower_bound(0.5, 100) == pytest.approx(0.4038, abs=1e-3)
    assert wilson_lower_bound(1.0, 100_000) > 0.9999
    assert wilson_lower_bound(0.0, 10) == 0.0


def test_dense_maps_are_judged_per_pixel_not_by_one_argmax_over_the_map():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(1, 4, 8, 8)) for _ in range(8)]
    cand = [r + rng.normal(scale=0.01, size=r.shape) for r in ref]

    fid = compare(ref, cand, "dense")

    assert fid.top1_agreement is None
    assert fid.pixel_agreement > 0.98 and fid.agreement_units == 8 * 8 * 8
    assert 0.9 < fid.agreement_lower_bound < fid.pixel_agreement
    assert fid.mean_iou > 0.95
    check(fid, Tolerance(max_abs_error=None, min_cosine=0.99, min_top1_agreement=0.95), "the map")


def test_embedding_neighbours_count_ties_as_matches_and_swaps_as_misses():
    ref = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1]])
    swapped = ref.copy()
    swapped[[2, 4]] = swapped[[4, 2]]  # samples 2 and 4 trade places: 3's neighbour changes

    assert compare(list(ref), list(ref + 1e-6), "embedding").neighbour_agreement == 1.0
    fid = compare(list(ref), list(swapped), "embedding")
    assert fid.neighbour_agreement < 1.0 and fid.agreement_units == 5


def test_a_failure_names_every_metric_and_how_many_may_differ():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=10) for _ in range(16)]
    cand = [r.copy() for r in ref]
    cand[0] = -cand[0]  # one flipped sample

    with pytest.raises(StepFailed) as failed:
        check(compare(ref, cand), Tolerance(max_abs_error=None, min_cosine=0.5, min_top1_agreement=0.99), "the model")

    message = str(failed.value)
    assert "top-1 agreement 0.9375 < 0.99 (at most 0 of 16 samples may differ" in message
    for metric in ("cosine", "max abs error", "mean rel error", "top-5 agreement", "95% lower bound", "output kind classification"):
        assert metric in message


def test_worst_of_several_outputs_keeps_the_worst_of_each_metric():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(3, 4, 4)) for _ in range(4)]
    good = compare(ref, ref, "dense")
    bad = compare(ref, [r[::-1] for r in ref], "dense")

    merged = worst([good, bad])

    assert merged.pixel_agreement == bad.pixel_agreement and merged.cosine == bad.cosine
    assert merged.output_kind == "dense" and merged.max_abs_error == bad.max_abs_error


@pytest.mark.parametrize("kind", ["classification", "other"])
def test_inf_outputs_fail_the_gate_instead_of_passing_as_nan(kind):
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(10,)) for _ in range(8)]
    cand = [np.full(10, np.inf) for _ in range(8)]

    fid = compare(ref, cand, kind)

    assert np.isnan(fid.cosine)  # the premise: every comparison with NaN is False
    with pytest.raises(StepFailed, match="cosine nan"):
        check(fid, Tolerance(max_abs_error=None, min_cosine=-1.0, min_top1_agreement=0.0), "int8")
