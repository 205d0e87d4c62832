"""The select step through run_step: it judges measured candidates, hands the chosen .mnn on and
publishes its reports; with nothing feasible it fails naming the closest and publishes nothing.

Fast: the candidates' models are fake .mnn files (the step only reads their size, from the bytes
on disk, and copies the chosen one); their metrics use the benchmark's names.
"""

from __future__ import annotations

import json

import pytest

from mnnpipe.errors import InputError, StepFailed
from mnnpipe.runner import run_step

SOURCE_TOP1 = 0.98
#: id -> (file size in bytes, p50 ms, top-1, cosine). c00 big and accurate, c01 small int8 within
#: 1 pp, c02 smallest but 8 pp worse, c03 fastest within 1 pp.
MEASURED = {
    "c00": (9_000, 0.40, 0.975, 0.9999),
    "c01": (3_000, 0.20, 0.970, 0.995),
    "c02": (1_500, 0.15, 0.900, 0.93),
    "c03": (5_000, 0.10, 0.972, 0.998),
}


def bench_metrics(p50: float, top1: float, cosine: float) -> dict[str, float]:
    """What a recipe's benchmark measures: the candidate as `candidate`, the source as `source`."""
    return {
        "candidate/t1_b1/p50_ms": p50,
        "candidate/t1_b1/p90_ms": p50 * 1.3,
        "candidate/top1": top1,
        "candidate/cosine": cosine,
        "source/t1_b1/p50_ms": 0.5,
        "source/top1": SOURCE_TOP1,
    }


@pytest.fixture
def candidates(tmp_path):
    """The four measured candidates, each with a fake .mnn of its size, plus two failed runs that
    claim the best numbers: c04 left no model, c05 left a (tiny) model but its run failed."""
    models = tmp_path / "models"
    models.mkdir()
    out = []
    for cid, (size, p50, top1, cosine) in MEASURED.items():
        path = models / f"{cid}.mnn"
        path.write_bytes((cid.encode() * size)[:size])  # distinct content per candidate
        assert path.stat().st_size == size
        out.append({
            "id": cid,
            "overrides": {"prune.target.ratio": 0.1 * int(cid[1:])},
            "recipe_digest": f"digest-{cid}",
            "model": {"uri": str(path)},
            "metrics": bench_metrics(p50, top1, cosine),
            "reference_metrics": {"fp32_accuracy": SOURCE_TOP1},
        })
    out.append({"id": "c04", "model": None, "error": "convert: unsupported op", "metrics": bench_metrics(0.01, 0.99, 1.0)})
    tiny = models / "c05.mnn"
    tiny.write_bytes(b"x" * 100)
    out.append({"id": "c05", "model": {"uri": str(tiny)}, "error": "benchmark: timed out", "metrics": bench_metrics(0.01, 0.99, 1.0)})
    return out


def select(candidates, out, **kw):
    return run_step("select", {"candidates": candidates, "output": str(out), **kw}, quiet=True)


@pytest.mark.parametrize(
    "constraints, objective, chosen",
    [
        ({}, {"kind": "smallest"}, "c02"),  # no limits: every candidate that ran is feasible
        ({"max_accuracy_drop": 1.0}, {"kind": "smallest"}, "c01"),
        ({"max_accuracy_drop": 1.0}, {"kind": "fastest"}, "c03"),
        ({}, {"kind": "most-accurate"}, "c00"),  # not c04/c05, which claim 0.99 but failed
        ({"max_size_bytes": 6_000, "max_latency_ms_p50": 0.25, "min_fidelity": 0.99}, {"kind": "most-accurate"}, "c03"),
        ({"max_size_bytes": 4_000}, {"kind": "most-accurate"}, "c01"),  # the size limit is on the file's bytes
        ({"max_accuracy_drop": 1.0}, {"kind": "weighted", "weights": {"size": 1, "latency": 0, "accuracy": 0}}, "c01"),
        ({"max_accuracy_drop": 1.0}, {"kind": "weighted", "weights": {"size": 0, "latency": 0, "accuracy": 1}}, "c00"),
    ],
)
def test_chooses_per_objective_and_constraints(candidates, tmp_path, cache_dir, constraints, objective, chosen):
    result = select(candidates, tmp_path / "out", constraints=constraints, objective=objective)

    assert result.chosen == chosen
    assert result.chosen_overrides == next(c["overrides"] for c in candidates if c["id"] == chosen)
    assert result.chosen_recipe_digest == f"digest-{chosen}"
    assert result.source == str(tmp_path / "models" / f"{chosen}.mnn")
    assert "c04" not in result.feasible and "c05" not in result.feasible  # failed runs are never feasible
    assert result.reason.startswith({"smallest": "smallest feasible", "fastest": "fastest feasible",
                                     "most-accurate": "most accurate feasible", "weighted": "best weighted score"}[objective["kind"]])


def test_publishes_the_chosen_model_its_metrics_and_the_reports(candidates, tmp_path, cache_dir):
    out = tmp_path / "out"

    result = select(candidates, out, constraints={"max_accuracy_drop": 1.0}, objective={"kind": "smallest"})

    assert result.chosen == "c01"
    # the chosen file's bytes are handed on as model.mnn
    assert (out / "model.mnn").read_bytes() == (tmp_path / "models" / "c01.mnn").read_bytes()
    assert {"model.mnn", "metrics.json", "report.html", "report.md", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert {"model.mnn", "metrics.json", "report.html", "report.md"} <= set(result.artifacts)
    m = result.metrics
    # the chosen candidate's own measurements under their own names, for the release gate
    assert m["candidate/top1"] == 0.970 and m["source/top1"] == SOURCE_TOP1 and m["candidate/t1_b1/p50_ms"] == 0.20
    assert m["fp32_accuracy"] == SOURCE_TOP1  # its model step's metrics too
    # every measured candidate's size, from the file's bytes; failed runs have none
    assert {cid: m[f"{cid}/size_bytes"] for cid in MEASURED} == {cid: float(v[0]) for cid, v in MEASURED.items()}
    assert m["chosen/size_bytes"] == 3_000 and m["candidates"] == 6 and m["feasible"] == 3
    assert "c04/size_bytes" not in m and "c05/size_bytes" not in m
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["chosen"] == "c01" and doc["feasible"] == ["c00", "c01", "c03"]
    by_id = {c["id"]: c for c in doc["candidates"]}
    assert by_id["c04"]["status"] == "failed" and by_id["c04"]["error"] == "convert: unsupported op"
    assert by_id["c05"]["status"] == "failed" and by_id["c05"]["size_bytes"] is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["result"]["chosen"] == "c01"
    assert "<td>c01 (chosen)</td>" in (out / "report.html").read_text()
    assert (out / "report.md").read_text().startswith("**Chosen:** c01: smallest feasible: c01 at 3,000 B")
    assert [c.id for c in result.candidates] == ["c00", "c01", "c02", "c03", "c04", "c05"]


def test_nothing_feasible_fails_naming_the_closest_and_publishes_nothing(candidates, tmp_path, cache_dir):
    out = tmp_path / "out"

    with pytest.raises(StepFailed) as e:
        select(candidates, out, constraints={"max_size_bytes": 1_000})

    msg = str(e.value)
    assert msg.startswith("select: no candidate of 6 meets the constraints; closest: ")
    # nearest first: c02 is 50% over, c01 200%, c03 400%; the failed runs after every measured miss
    assert "closest: c02 (size 1,500 B > max 1,000 B); c01 (size 3,000 B > max 1,000 B); c03 (size 5,000 B > max 1,000 B)" in msg
    assert e.value.exit_code == 1
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not any(out.iterdir())  # no model.mnn handed on, no report published


def test_a_failed_candidate_is_never_chosen_even_alone_with_the_best_numbers(candidates, tmp_path, cache_dir):
    failed = [c for c in candidates if c["id"] in ("c04", "c05")]

    with pytest.raises(StepFailed, match=r"no candidate of 2 meets the constraints; closest: c04 \(failed: convert: unsupported op\); "
                                         r"c05 \(failed: benchmark: timed out\)"):
        select(failed, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_metric_names_pick_another_benchmark_setting(candidates, tmp_path, cache_dir):
    for c in candidates:  # at 4 threads c00 is the fastest
        c["metrics"]["candidate/t4_b1/p50_ms"] = 0.05 if c["id"] == "c00" else 0.3
    result = select(candidates, tmp_path / "out", objective={"kind": "fastest"}, metric_names={"latency_p50": "candidate/t4_b1/p50_ms"})
    assert result.chosen == "c00"
    assert result.metrics["c00/p50_ms"] == 0.05


def test_a_chosen_model_that_is_not_mnn_is_an_input_error(candidates, tmp_path, cache_dir):
    onnx = tmp_path / "models" / "c02.onnx"
    onnx.write_bytes(b"o" * 1_500)
    candidates[2]["model"] = {"uri": str(onnx)}

    with pytest.raises(InputError, match=r"candidates: the chosen candidate c02's model .*c02\.onnx is not an \.mnn file"):
        select(candidates, tmp_path / "out", objective={"kind": "smallest"})
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_duplicate_ids_are_a_spec_error(candidates, tmp_path):
    from mnnpipe.errors import SpecError

    candidates[1]["id"] = "c00"
    with pytest.raises(SpecError, match=r"candidate ids must be unique, got \['c00'\]"):
        select(candidates, tmp_path / "out")
