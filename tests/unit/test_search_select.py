"""Choosing among measured candidates: violations, the Pareto front, each objective, ties, and the
nearest candidates when none is feasible."""

from __future__ import annotations

import pytest

from mnnpipe.errors import InputError
from mnnpipe.search.select import CandidateMetrics, excess, pareto_front, select, violations
from mnnpipe.search.spec import Constraints, Objective


def cm(cid, size=None, p50=None, acc=None, ref=0.97, **kw):
    return CandidateMetrics(id=cid, size_bytes=size, latency_ms_p50=p50, accuracy=acc, reference_accuracy=ref, **kw)


# size, p50, accuracy: c00 big/slow/accurate, c01 small/fast, c02 dominated by c01, c03 equal to c01,
# c04 smallest but least accurate, c05 failed.
SET = [
    cm("c00", 90_000, 0.40, 0.970),
    cm("c01", 40_000, 0.20, 0.960),
    cm("c02", 45_000, 0.25, 0.950),
    cm("c03", 40_000, 0.20, 0.960),
    cm("c04", 20_000, 0.30, 0.900),
    cm("c05", status="failed", error="convert: unsupported op"),
]


def test_pareto_front_drops_dominated_keeps_ties_and_skips_failed():
    assert pareto_front(SET) == ["c00", "c01", "c03", "c04"]


def test_a_missing_metric_counts_as_worst_on_the_front():
    cands = [cm("a", 10, 1.0, None), cm("b", 10, 1.0, 0.5)]
    assert pareto_front(cands) == ["b"]
    assert pareto_front([cm("a", 10, 1.0, None), cm("b", 20, 1.0, None)]) == ["a"]


def test_violations_in_words():
    k = Constraints(max_size_bytes=60_000, max_latency_ms_p50=0.3, max_accuracy_drop=1.0, min_fidelity=0.99)
    c = CandidateMetrics(id="x", size_bytes=81_234, latency_ms_p50=0.31, accuracy=0.95, reference_accuracy=0.97, fidelity=0.98)
    assert violations(c, k) == [
        "size 81,234 B > max 60,000 B",
        "p50 0.31 ms > max 0.3 ms",
        "accuracy drop 2.00 pp > max 1 pp",
        "fidelity 0.9800 < min 0.99",
    ]
    assert violations(CandidateMetrics(id="y"), k) == [
        "size not measured", "latency not measured", "accuracy not measured", "fidelity not measured"
    ]
    assert violations(cm("z", acc=0.9, ref=None), Constraints(max_accuracy_drop=1)) == ["reference accuracy not measured"]
    assert violations(SET[5], k) == ["failed: convert: unsupported op"]
    assert violations(SET[5], Constraints()) == ["failed: convert: unsupported op"]
    assert violations(cm("at-limit", 60_000, 0.3, 0.96), Constraints(max_size_bytes=60_000, max_accuracy_drop=1.0)) == []


@pytest.mark.parametrize(
    "objective, chosen",
    [
        (Objective(kind="smallest"), "c04"),
        (Objective(kind="fastest"), "c01"),  # c01 and c03 tie on everything: the id decides
        (Objective(kind="most-accurate"), "c00"),
        (Objective(kind="weighted", weights={"size": 1, "accuracy": 1}), "c01"),
        (Objective(kind="weighted", weights={"latency": 1}), "c01"),
        (Objective(kind="weighted", weights={"accuracy": 1}), "c00"),
    ],
)
def test_each_objective_over_the_feasible_set(objective, chosen):
    sel = select(SET, Constraints(), objective)
    assert sel.chosen == chosen
    assert sel.feasible == ["c00", "c01", "c02", "c03", "c04"]
    assert sel.front == ["c00", "c01", "c03", "c04"]


def test_constraints_shape_the_choice_and_the_reason_has_the_numbers():
    sel = select(SET, Constraints(max_accuracy_drop=1.5), Objective(kind="smallest"))
    assert sel.chosen == "c01"  # c04 is smaller but drops 7 pp
    assert sel.feasible == ["c00", "c01", "c03"]
    assert sel.violations["c04"] == ["accuracy drop 7.00 pp > max 1.5 pp"]
    assert sel.reason == "smallest feasible: c01 at 40,000 B (p50 0.2 ms, top-1 96.0%, -1.0 pp); 3 of 6 candidates feasible (1 failed)"


def test_ties_fall_to_the_other_objectives_then_the_id():
    cands = [cm("b", 100, 2.0, 0.9), cm("a", 100, 2.0, 0.9), cm("c", 100, 1.0, 0.9), cm("d", 100, 1.0, 0.95)]
    assert select(cands, Constraints(), Objective(kind="smallest")).chosen == "d"  # size tie -> faster -> more accurate
    assert select(cands[:2], Constraints(), Objective(kind="smallest")).chosen == "a"


def test_weighted_normalizes_over_feasible_candidates_only():
    # With z in the range, c's accuracy cost is small (0.08) and c wins; over a, b, c alone b does.
    cands = [cm("a", 1000, 1.0, 0.97), cm("b", 600, 1.0, 0.96), cm("c", 200, 1.0, 0.90), cm("z", 10, 1.0, 0.10)]
    w = Objective(kind="weighted", weights={"size": 1, "accuracy": 1})
    assert select(cands, Constraints(), w).chosen == "c"
    sel = select(cands, Constraints(max_accuracy_drop=10), w)
    assert sel.chosen == "b"  # a: 1 + 0, b: 0.5 + 1/7, c: 0 + 1
    assert sel.reason.startswith("best weighted score 0.643 (size 1, latency 0, accuracy 1): b at 600 B")


def test_none_feasible_lists_the_three_closest_nearest_first():
    k = Constraints(max_size_bytes=30_000, max_accuracy_drop=1.0)
    sel = select(SET, k, Objective())
    assert sel.chosen is None and sel.feasible == []
    # c04: 20,000 B fits, drop 7 pp (6 pp over a 1 pp limit -> 6.0); c01/c03: size 1/3 over, drop 0 ->
    # 0.333; c02: size 0.5 over, drop 1 pp over the 1 pp limit -> 1.5; c00: 2.0; failed last.
    assert [c.id for c in sel.closest] == ["c01", "c03", "c02"]
    assert sel.closest[0].violations == ["size 40,000 B > max 30,000 B"]
    assert sel.closest[0].excess == pytest.approx(1 / 3, abs=1e-6)
    assert sel.reason.startswith("no candidate meets the constraints: 0 of 6 candidates feasible (1 failed); closest: c01 (size 40,000 B > max 30,000 B)")


def test_unmeasured_and_failed_candidates_are_furthest_from_feasible():
    k = Constraints(max_size_bytes=10, max_accuracy_drop=0.0)
    cands = [cm("failed", status="failed", error="x"), cm("nosize", None, 1.0, 0.97), cm("huge", 10**9, 1.0, 0.5)]
    assert [c.id for c in select(cands, k, Objective()).closest] == ["huge", "nosize", "failed"]
    assert excess(cands[0], k) == (1, 0, 0.0)
    assert select(cands, k, Objective()).closest[2].excess is None


def test_non_finite_measurements_are_not_measured_and_ids_must_be_unique():
    assert CandidateMetrics(id="x", latency_ms_p50=float("nan"), fidelity=float("inf")).latency_ms_p50 is None
    with pytest.raises(InputError, match="duplicate ids"):
        select([cm("a", 1, 1.0, 0.9), cm("a", 2, 1.0, 0.9)], Constraints(), Objective())
    assert select([], Constraints(), Objective()).chosen is None
