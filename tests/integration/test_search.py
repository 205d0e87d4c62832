"""Recipe search end to end: `mnnpipe search` (the real CLI, in a subprocess) and the KFP search
pipeline on kfp.local, on a tiny trained digits teacher.

The released model is checked independently of the select step: feasibility and the objective
are recomputed here from each candidate's own published benchmark (`<candidate>/benchmark/
result.json`, its model named by the benchmark's manifest inputs), and the released bytes must
be that candidate's model. Sizes are tiny (1-2 epochs, 10 benchmark iterations) so the local
search takes ~30 s and the KFP one ~2 min on two cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MNNPIPE = Path(sys.executable).parent / "mnnpipe"
DIGITS = {"format": "sklearn-digits", "preprocess": {"channels": "GRAY"}}
INPUT = {"name": "input", "shape": [1, 1, 8, 8]}
#: The candidate steps in chain order (a step's cache key depends on every override at or before it).
CHAIN = ("distill", "prune", "convert", "quantize", "benchmark")
#: select's allowance for float noise on a limit (mnnpipe.search.select._EPS), restated here.
EPS = 1e-9


def digits(split: str, **extra) -> dict:
    return {**DIGITS, "split": split, **extra}


QUANTIZE = {
    "input": INPUT,
    "calibration": digits("train", limit=64),
    "evaluation": digits("test", limit=200),
    "calibration_samples": 32,
    "max_accuracy_drop": 50.0,
}


def full_recipe() -> dict:
    """distill -> prune -> convert -> quantize -> benchmark -> gate, each as small as it gets."""
    return {
        "model": {"format": "state-dict", "factory": "mnnpipe.models:digits_cnn"},
        "compare": "source",
        "distill": {"student": {"architecture": "digits_cnn", "width": 0.5}, "dataset": digits("all"), "training": {"epochs": 2, "batch_size": 64}},
        "prune": {
            "model": {"factory": "mnnpipe.models:digits_cnn", "factory_kwargs": {"width": 0.5}},
            "input": INPUT,
            "target": {"ratio": 0.25},
            "finetune": {"dataset": digits("train", limit=256), "epochs": 1},
        },
        "convert": {"inputs": [INPUT], "num_samples": 4},
        "quantize": dict(QUANTIZE),
        "benchmark": {"dataset": digits("test", limit=100), "inputs": [INPUT], "threads": [1], "warmup": 2, "iterations": 10, "reference": "source"},
        "gate": {"metric": "candidate/top1", "reference_metric": "source/top1", "max_drop": 50.0},
    }


def short_recipe() -> dict:
    """convert -> quantize -> benchmark -> gate on the teacher itself: a few seconds a candidate."""
    recipe = full_recipe()
    del recipe["distill"], recipe["prune"]
    return recipe


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A digits_cnn trained for 2 epochs (~2 s; top-1 ~0.98 on the benchmark's 100 test digits)."""
    import torch

    from mnnpipe.data import load_dataset
    from mnnpipe.models import digits_cnn
    from mnnpipe.specs import DatasetRef
    from mnnpipe.train import FitConfig, fit, seed_everything

    seed_everything(0)
    model = digits_cnn()
    fit(model, load_dataset(DatasetRef.model_validate(digits("train")), None), FitConfig(epochs=2, batch_size=64, lr=3e-3))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def mnnpipe_search(tmp_path: Path, spec: dict, model_uri: str, *extra: str) -> subprocess.CompletedProcess:
    """`mnnpipe --quiet search` with the spec written as YAML; outputs under tmp_path."""
    spec_file = tmp_path / "search.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [str(MNNPIPE), "--quiet", "search", "--spec", str(spec_file), "--model-uri", model_uri, "--output", str(tmp_path / "out"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- independent judging


@dataclass
class Judged:
    """One candidate's numbers, read from its own benchmark output (not from select)."""

    id: str
    model: Path
    model_sha256: str
    size: int
    p50: float
    accuracy: float
    reference: float
    fidelity: float

    @property
    def drop_pp(self) -> float:
        return (self.reference - self.accuracy) * 100.0


def judge(candidate_dir: Path, teacher: str) -> Judged:
    bench = candidate_dir / "benchmark"
    metrics = json.loads((bench / "result.json").read_text())["metrics"]
    inputs = json.loads((bench / "manifest.json").read_text())["inputs"]
    (model_uri, model_sha), = [(uri, sha) for uri, sha in inputs.items() if uri != teacher]  # the candidate's model
    model = Path(model_uri)
    assert model.is_relative_to(candidate_dir), f"{candidate_dir.name} benchmarked another candidate's model: {model}"
    assert sha256(model) == model_sha
    assert metrics["candidate/size_bytes"] == model.stat().st_size
    return Judged(
        id=candidate_dir.name, model=model, model_sha256=model_sha, size=model.stat().st_size,
        p50=metrics["candidate/t1_b1/p50_ms"], accuracy=metrics["candidate/top1"], reference=metrics["source/top1"],
        fidelity=metrics["candidate/cosine"],
    )  # fmt: skip


def judge_all(root: Path, ids: list[str], teacher: str) -> dict[str, Judged]:
    return {cid: judge(root / cid, teacher) for cid in ids}


def violations(c: Judged, constraints: dict) -> list[str]:
    out = []
    if "max_size_bytes" in constraints and c.size > constraints["max_size_bytes"]:
        out.append("size")
    if "max_accuracy_drop" in constraints and c.drop_pp > constraints["max_accuracy_drop"] + EPS:
        out.append("accuracy")
    if "min_fidelity" in constraints and c.fidelity < constraints["min_fidelity"] - EPS:
        out.append("fidelity")
    return out


def best(judged: dict[str, Judged], constraints: dict) -> tuple[str, list[str]]:
    """(the smallest feasible candidate, the feasible ids): least bytes, then median latency, then
    accuracy, then id, as the search spec documents for objective `smallest`."""
    feasible = [c for c in judged.values() if not violations(c, constraints)]
    assert feasible, "no candidate is feasible: the constraints of this test no longer fit its tiny models"
    chosen = min(feasible, key=lambda c: (c.size, c.p50, -c.accuracy, c.id))
    return chosen.id, sorted(c.id for c in feasible)


def expected_cache_hits(space: dict[str, list], n: int) -> dict[str, int]:
    """Per step, candidates minus the distinct inputs of that step: a step is computed once per
    distinct combination of the values set at or before it in the chain (grid, all distinct)."""
    hits = {}
    for i, step in enumerate(CHAIN):
        distinct = math.prod(len(values) for path, values in space.items() if CHAIN.index(path.split(".")[0]) <= i)
        hits[step] = n - distinct
    return hits


def cache_hits_published(root: Path, ids: list[str]) -> dict[str, int]:
    """Per step, how many candidates' published results say they came from the cache."""
    return {
        step: sum(json.loads((root / cid / step / "result.json").read_text())["cached"] for cid in ids if (root / cid / step).exists())
        for step in CHAIN
    }


def the_release(release_root: Path, name: str, version: str) -> Path:
    releases = [p.parent for p in (release_root / name / version).glob("*/manifest.json")]
    assert len(releases) == 1, f"expected one release, found {releases}"
    return releases[0]


def assert_released(release_root: Path, name: str, chosen: Judged) -> None:
    """The one release holds the chosen candidate's bytes, its manifest says so, latest points at it."""
    release = the_release(release_root, name, "1")
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["step"] == "gate"
    artifact = manifest["artifacts"]["model.mnn"]
    assert artifact["sha256"] == sha256(release / "model.mnn") == chosen.model_sha256, f"released model is not {chosen.id}'s"
    assert artifact["size"] == chosen.size
    latest = json.loads((release_root / name / "latest.json").read_text())
    assert Path(latest["release"]) == release
    assert latest["version"] == "1"
    assert latest["manifest_sha256"] == sha256(release / "manifest.json")


# --------------------------------------------------------------------------- local: mnnpipe search

#: 3 prune ratios x 2 calibration sizes = 6 candidates, c00..c05 in grid order (the last path
#: varies fastest). One distilled student for all; each ratio one pruned model and one fp32 .mnn.
LOCAL_SPACE = {"prune.target.ratio": [0.2, 0.4, 0.6], "quantize.calibration_samples": [16, 32]}
#: ~8 pp drop at ratios 0.2/0.4, ~20 at 0.6 with these epochs: the smallest models are out.
LOCAL_CONSTRAINTS = {"max_accuracy_drop": 15.0}


def test_search_releases_the_smallest_feasible_candidate_with_shared_steps_from_the_cache(teacher, tmp_path, cache_dir):
    # Arrange
    spec = {"base": full_recipe(), "space": LOCAL_SPACE, "budget": 6, "constraints": LOCAL_CONSTRAINTS, "objective": {"kind": "smallest"}}
    ids = [f"c{i:02d}" for i in range(6)]
    release_root = tmp_path / "released"

    # Act
    proc = mnnpipe_search(tmp_path, spec, teacher, "--release-root", str(release_root), "--name", "digits", "--version", "1")

    # Assert: chosen as recomputed from the candidates' own benchmarks.
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "out" / "candidates"
    assert sorted(p.name for p in root.iterdir()) == ids
    judged = judge_all(root, ids, teacher)
    chosen, feasible = best(judged, LOCAL_CONSTRAINTS)
    # The test's premise: the constraints rule some (not all) out, and the best is not c00, so
    # ignoring the constraints or the objective picks another candidate.
    assert 0 < len(feasible) < len(ids), {c.id: round(c.drop_pp, 1) for c in judged.values()}
    assert chosen != "c00" and min(judged.values(), key=lambda c: (c.size, c.p50)).id not in feasible
    selection = json.loads((tmp_path / "out" / "select" / "metrics.json").read_text())
    assert selection["chosen"] == chosen, selection["reason"]
    assert sorted(selection["feasible"]) == feasible
    assert_released(release_root, "digits", judged[chosen])
    assert f"chosen: {chosen} " in proc.stdout

    # Assert: the shared prefixes were computed once (5 distill, 3 prune and 3 convert hits).
    expected = expected_cache_hits(LOCAL_SPACE, len(ids))
    assert expected == {"distill": 5, "prune": 3, "convert": 3, "quantize": 0, "benchmark": 0}
    assert cache_hits_published(root, ids) == expected
    assert f"cache: {sum(expected.values())} of {len(ids) * len(CHAIN)} candidate steps served from the cache" in proc.stdout


def toggle_spec(**constraints) -> dict:
    """Two candidates on the short recipe: c00 int8 (quantize on), c01 the fp32 .mnn (quantize off)."""
    return {"base": short_recipe(), "space": {"quantize": [dict(QUANTIZE), None]}, "budget": 2, "constraints": constraints, "objective": {"kind": "smallest"}}


def test_no_feasible_candidate_exits_1_naming_the_closest_and_releases_nothing(teacher, tmp_path, cache_dir):
    # Arrange: 1,000 bytes is below any digits model.
    constraints = {"max_size_bytes": 1000}
    release_root = tmp_path / "released"

    # Act
    proc = mnnpipe_search(tmp_path, toggle_spec(**constraints), teacher, "--release-root", str(release_root), "--name", "digits")

    # Assert: one line, the closest first (the smaller one misses the limit by less).
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: select: no candidate of 2 meets the constraints"), proc.stderr
    judged = judge_all(tmp_path / "out" / "candidates", ["c00", "c01"], teacher)
    assert all(violations(c, constraints) for c in judged.values())
    nearest = sorted(judged.values(), key=lambda c: (c.size, c.id))
    closest = lines[0].split("closest:", 1)[1]
    assert nearest[0].id in closest and nearest[1].id in closest
    assert closest.index(nearest[0].id) < closest.index(nearest[1].id)
    # Nothing handed on, nothing released.
    assert not (tmp_path / "out" / "select" / "manifest.json").exists()
    assert not list(release_root.rglob("manifest.json")) and not list(release_root.rglob("latest.json"))


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ({"prune.target.ratio": []}, ["space.prune.target.ratio", "empty list"]),
        ({"prune.target.ratoi": [0.2, 0.4]}, ["candidate c00", "prune.target.ratoi=0.2", "recipe.prune.target.ratoi", "unknown field"]),
        ({"prune.target.ratio": [0.2, 1.5]}, ["candidate c01", "prune.target.ratio=1.5", "recipe.prune.target.ratio"]),
    ],
    ids=["empty-values", "no-such-field", "bad-second-value"],
)
def test_a_bad_space_exits_2_naming_the_field_before_anything_runs(space, named, tmp_path, cache_dir):
    # Arrange: the model does not exist: nothing may get as far as reading it.
    spec = {"base": full_recipe(), "space": space, "budget": 4}

    # Act
    proc = mnnpipe_search(tmp_path, spec, str(tmp_path / "no-such-teacher.pth"), "--release-root", str(tmp_path / "released"))

    # Assert
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for words in named:
        assert words in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "released").exists()


def test_a_step_toggled_on_and_off_runs_locally_but_kfp_refuses_it(teacher, tmp_path, cache_dir):
    from mnnpipe.errors import SpecError
    from mnnpipe.kfp.search import build_search_pipeline

    # Arrange
    spec = toggle_spec()

    # Act / Assert: a ParallelFor body is one chain of steps.
    with pytest.raises(SpecError, match=r"^space: candidate c01 runs convert -> benchmark, not convert -> quantize -> benchmark"):
        build_search_pipeline(spec, form="lightweight", model_uri=teacher)

    # Act: locally each candidate runs its own chain.
    release_root = tmp_path / "released"
    proc = mnnpipe_search(tmp_path, spec, teacher, "--release-root", str(release_root), "--name", "digits")

    # Assert: c00 quantized, c01 released its fp32 .mnn from convert; one conversion for both.
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "out" / "candidates"
    assert (root / "c00" / "quantize" / "model.mnn").exists() and not (root / "c01" / "quantize").exists()
    judged = judge_all(root, ["c00", "c01"], teacher)
    assert judged["c01"].model == root / "c01" / "convert" / "model.mnn"
    chosen, _ = best(judged, {})
    assert chosen == "c00"  # int8 is about a quarter of the fp32 bytes
    assert_released(release_root, "digits", judged[chosen])
    assert cache_hits_published(root, ["c00", "c01"]) == {"distill": 0, "prune": 0, "convert": 1, "quantize": 0, "benchmark": 0}


def test_a_process_pool_runs_the_candidates_and_still_shares_their_prefix(teacher, tmp_path, cache_dir):
    # Arrange: both candidates start with the same convert; the pool runs one candidate per
    # distinct first step before the rest, so the second still finds it in the cache.
    release_root = tmp_path / "released"

    # Act
    proc = mnnpipe_search(tmp_path, toggle_spec(), teacher, "--release-root", str(release_root), "--name", "digits", "--workers", "2")

    # Assert: the same choice and the same cache hits as one after another.
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "out" / "candidates"
    judged = judge_all(root, ["c00", "c01"], teacher)
    chosen, _ = best(judged, {})
    assert chosen == "c00"
    assert_released(release_root, "digits", judged[chosen])
    assert cache_hits_published(root, ["c00", "c01"]) == {"distill": 0, "prune": 0, "convert": 1, "quantize": 0, "benchmark": 0}


# --------------------------------------------------------------------------- KFP: ParallelFor + fan-in

#: 4 prune ratios, one chain each: c00 (0.2) and c01 (0.4) within ~11 pp, 0.6 and 0.7 not.
KFP_SPACE = {"prune.target.ratio": [0.2, 0.4, 0.6, 0.7]}
KFP_CONSTRAINTS = {"max_accuracy_drop": 15.0}
PARALLELISM = 2


def kfp_search_spec() -> dict:
    return {"base": full_recipe(), "space": KFP_SPACE, "budget": 4, "constraints": KFP_CONSTRAINTS, "objective": {"kind": "smallest"}}


def test_kfp_search_compiles_one_parallel_for_over_the_candidates_fanning_in_to_select(tmp_path):
    from mnnpipe.kfp.pipeline import compile_pipeline
    from mnnpipe.kfp.search import build_search_pipeline

    # Act
    pipeline = build_search_pipeline(kfp_search_spec(), form="lightweight", model_uri="/models/teacher.pth", parallelism=PARALLELISM)
    compile_pipeline(pipeline, str(tmp_path / "search.yaml"))

    # Assert: a loop over the 4 candidates' items, at most 2 at once, holding the whole chain.
    ir = yaml.safe_load((tmp_path / "search.yaml").read_text())
    tasks = ir["root"]["dag"]["tasks"]
    loops = {name: t for name, t in tasks.items() if "parameterIterator" in t}
    assert len(loops) == 1, list(tasks)
    (loop_name, loop), = loops.items()
    items = json.loads(loop["parameterIterator"]["items"]["raw"])
    assert [item["id"] for item in items] == ["c00", "c01", "c02", "c03"]
    assert [json.loads(item["prune"])["target"]["ratio"] for item in items] == KFP_SPACE["prune.target.ratio"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == PARALLELISM
    body = ir["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert {f"mnnpipe-{step}" for step in CHAIN} <= set(body)
    # Fan-in: select collects from the loop, the gate and nothing else follows select.
    assert tasks["mnnpipe-select"]["dependentTasks"] == [loop_name]
    collected = tasks["mnnpipe-select"]["inputs"]["artifacts"]
    assert {a["taskOutputArtifact"]["producerTask"] for a in collected.values()} == {loop_name}
    assert tasks["mnnpipe-gate"]["dependentTasks"] == ["mnnpipe-select"]


def test_kfp_search_on_kfp_local_releases_the_smallest_feasible_candidate(teacher, tmp_path, cache_dir, monkeypatch):
    # Arrange: kfp.local runs each task as a subprocess of this environment; the step store and
    # the release root are local folders, the cache index is this test's own.
    from kfp import local

    from mnnpipe.kfp.search import build_search_pipeline

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))
    store, release_root = tmp_path / "runs", tmp_path / "released"
    pipeline = build_search_pipeline(
        kfp_search_spec(), form="lightweight", model_uri=teacher, store_prefix=str(store), release_root=str(release_root),
        model_name="digits", parallelism=PARALLELISM,
    )  # fmt: skip
    ids = ["c00", "c01", "c02", "c03"]

    # Act
    pipeline()

    # Assert: chosen as recomputed from the candidates' own benchmarks, and released.
    (run,) = (store / "digits" / "1").glob("search-*")
    judged = judge_all(run, ids, teacher)
    chosen, feasible = best(judged, KFP_CONSTRAINTS)
    assert 0 < len(feasible) < len(ids) and chosen != "c00", {c.id: round(c.drop_pp, 1) for c in judged.values()}
    selection = json.loads((run / "select" / "metrics.json").read_text())
    assert selection["chosen"] == chosen and sorted(selection["feasible"]) == feasible
    assert_released(release_root, "digits", judged[chosen])
    # The first `parallelism` candidates distill at once; the rest reuse their student.
    assert cache_hits_published(run, ids)["distill"] == len(ids) - PARALLELISM


# --------------------------------------------------------------------------- the installed package


def test_the_installed_package_compiles_the_compress_pipeline_outside_the_repository(tmp_path):
    # Arrange: another folder, no PYTHONPATH, the default image.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MNNPIPE_IMAGE")}
    code = (
        "import mnnpipe; print(mnnpipe.__file__); "
        "from mnnpipe.kfp.pipeline import compress_pipeline, compile_pipeline; compile_pipeline(compress_pipeline(), 'x.yaml')"
    )

    # Act
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[0]).is_relative_to(REPO / "mnnpipe")  # the editable install
    assert (tmp_path / "x.yaml").read_text() == (REPO / "pipelines" / "compress.yaml").read_text()
