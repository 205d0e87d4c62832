"""The cache key: the spec with each input URI replaced by its content digest, where it stands
(its role), plus the versions of the engines that shape the output."""

from typing import Literal

import pytest

from mnnpipe import runner
from mnnpipe.runner import cache_key, input_fields, input_refs
from mnnpipe.specs import DatasetRef, ModelRef, StepSpec


class PairSpec(StepSpec):
    """Two models in two roles, e.g. a champion/challenger comparison."""

    kind: Literal["pair"] = "pair"
    champion: ModelRef
    challenger: ModelRef
    data: DatasetRef | None = None
    extra: list[ModelRef] = []


def pair(champion: str, challenger: str, output: str = "/out/a", **kw) -> PairSpec:
    return PairSpec(output=output, champion={"uri": champion}, challenger={"uri": challenger}, **kw)


def test_input_fields_name_each_role():
    spec = pair("s3://bkt/a.pt", "s3://bkt/b.pt", data={"format": "npz", "uri": "/d.npz"}, extra=[{"uri": "/c.onnx"}])
    assert input_fields(spec) == {
        ("champion", "uri"): "s3://bkt/a.pt",
        ("challenger", "uri"): "s3://bkt/b.pt",
        ("data", "uri"): "/d.npz",
        ("extra", 0, "uri"): "/c.onnx",
    }
    assert input_refs(spec) == ["s3://bkt/a.pt", "s3://bkt/b.pt", "/d.npz", "/c.onnx"]


def test_inputs_that_swap_contents_at_fixed_uris_miss():
    spec = pair("/reg/champion.pt", "/reg/challenger.pt")
    before = cache_key("pair", spec, {"/reg/champion.pt": "d1", "/reg/challenger.pt": "d2"})
    rolled_back = cache_key("pair", spec, {"/reg/champion.pt": "d2", "/reg/challenger.pt": "d1"})
    assert before != rolled_back


def test_same_bytes_under_a_new_prefix_hit():
    yesterday = pair("s3://bkt/nightly/2026-11-29/a.pt", "s3://bkt/nightly/2026-11-29/b.pt", output="s3://bkt/out/2026-11-29")
    today = pair("s3://bkt/nightly/2026-11-30/a.pt", "s3://bkt/nightly/2026-11-30/b.pt", output="s3://bkt/out/2026-11-30")
    digests = ["d1", "d2"]
    key_y = cache_key("pair", yesterday, dict(zip(input_refs(yesterday), digests)))
    key_t = cache_key("pair", today, dict(zip(input_refs(today), digests)))
    assert key_y == key_t


def test_other_parameters_and_steps_still_change_the_key():
    spec = pair("/a.pt", "/b.pt")
    digests = {"/a.pt": "d1", "/b.pt": "d2"}
    assert cache_key("pair", spec, digests) != cache_key("pair", spec.model_copy(update={"seed": 1}), digests)
    assert cache_key("pair", spec, digests) != cache_key("other", spec, digests)


@pytest.mark.parametrize("engine", ["MNN", "torch", "onnx", "onnxruntime", "mnnpipe"])
def test_a_different_engine_version_misses(engine, monkeypatch):
    spec = pair("/a.pt", "/b.pt")
    digests = {"/a.pt": "d1", "/b.pt": "d2"}
    real = runner.versions()
    before = cache_key("pair", spec, digests)
    monkeypatch.setattr(runner, "versions", lambda: {**real, engine: "0.0.0-other"})
    assert cache_key("pair", spec, digests) != before
