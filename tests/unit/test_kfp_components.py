"""KFP components and the compress pipeline: generated from the step Specs, committed fresh,
strictly valid IR, and invalid recipes rejected at build time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    from mnnpipe.container import DEFAULT_IMAGE
    from mnnpipe.kfp.generate import generated_files

    return generated_files(REPO, DEFAULT_IMAGE)


def test_committed_generated_files_are_fresh(generated):
    stale = [rel for rel, text in generated.items() if not (REPO / rel).is_file() or (REPO / rel).read_text() != text]
    assert stale == [], f"stale or missing (run `python -m mnnpipe.kfp.generate`): {stale}"


def test_every_available_step_has_a_loadable_component_with_spec_driven_inputs():
    from kfp import components

    from mnnpipe.kfp.interface import step_interface
    from mnnpipe import catalog

    for step in catalog.names():
        comp = components.load_component_from_file(str(REPO / "components" / step / "component.yaml"))
        inputs = comp.component_spec.inputs
        iface = step_interface(step)
        assert inputs["spec"].type == "String"
        for field in iface.model_inputs:
            assert inputs[field].type.startswith("system.Model") and inputs[field].optional
        for field in iface.dataset_inputs:
            assert inputs[field].type.startswith("system.Dataset")
        outputs = comp.component_spec.outputs
        assert outputs["metrics"].type.startswith("system.Metrics")
        assert outputs["report"].type.startswith("system.Markdown")
        assert ("output_model" in outputs) == iface.produces_model
        container = comp.component_spec.implementation.container
        assert container.command == ["mnnpipe", "kfp-launch"] and container.args[0] == step


def test_a_new_spec_field_of_type_modelref_becomes_a_component_input():
    # Arrange: the convert Spec has a `model: ModelRef`, the quantize Spec a `calibration: DatasetRef`.
    from mnnpipe.kfp.components import component_interface

    # Act
    convert, quantize = component_interface("convert"), component_interface("quantize")

    # Assert
    assert "model" in convert.model_inputs
    assert {"calibration", "evaluation"} <= set(quantize.dataset_inputs)


def test_compiled_pipeline_parses_strictly_as_pipeline_spec(generated):
    import yaml
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    doc = yaml.safe_load(generated["pipelines/compress.yaml"])
    spec = json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())  # rejects unknown fields
    tasks = spec.root.dag.tasks
    assert {"mnnpipe-convert", "mnnpipe-quantize", "mnnpipe-gate"} <= set(tasks)
    # quantize reads convert's fp32 .mnn: MNN's int8 tool needs it
    assert tasks["mnnpipe-quantize"].inputs.artifacts["model"].task_output_artifact.producer_task == "mnnpipe-convert"
    assert set(spec.root.input_definitions.parameters) >= {"model_uri", "model_name", "model_version", "store_prefix", "release_root"}


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("quantize", "calibration_samples"), 0, "recipe.quantize.calibration_samples"),
        (("quantize", "activation_method"), "ADMM", "recipe.quantize.activation_method"),
        (("convert", "colour"), "red", "recipe.convert.colour"),
        (("gate", "max_drop"), -1, "recipe.gate.max_drop"),
    ],
)
def test_building_the_pipeline_with_an_invalid_recipe_raises_spec_error_naming_the_field(path, value, field):
    import copy
    import importlib.util

    from mnnpipe.errors import SpecError
    from mnnpipe.kfp.pipeline import build_pipeline

    spec = importlib.util.spec_from_file_location("pipelines_compress_test", REPO / "pipelines" / "compress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = copy.deepcopy(module.DEFAULT_RECIPE)
    recipe[path[0]][path[1]] = value

    with pytest.raises(SpecError) as err:
        build_pipeline(recipe)
    assert str(err.value).startswith(field)


def test_recipe_without_convert_is_rejected():
    from mnnpipe.errors import SpecError
    from mnnpipe.recipe import parse_recipe

    with pytest.raises(SpecError, match="recipe.convert: required field is missing"):
        parse_recipe({"gate": {"metric": "accuracy", "min_value": 0.5}})


def test_launcher_binds_artifact_uri_over_uri_parameter_and_fills_list_items():
    from mnnpipe.kfp.launcher import ArtifactRef, bind_spec

    spec = json.dumps({"model": {"format": "mnn"}, "models": [{"label": "candidate", "model": {}}, {"label": "ref", "model": {"uri": "x.pt"}}]})
    artifact = ArtifactRef(uri="s3://root/a", path="/s3/root/a", metadata={"mnnpipe_uri": "s3://store/run/model.mnn", "format": "mnn"})

    data = bind_spec(
        spec,
        ref_fields=("model", "models", "dataset"),
        artifacts={"model": artifact, "models": artifact},
        uris={"model": "s3://ignored/model.mnn", "dataset": "s3://data/digits.npz"},
        output_uri="s3://store/run/convert",
        model_lists=(("models", "model"),),
    )

    assert data["model"] == {"format": "mnn", "uri": "s3://store/run/model.mnn"}
    assert data["models"][0]["model"] == {"uri": "s3://store/run/model.mnn", "format": "mnn"}
    assert data["models"][1]["model"] == {"uri": "x.pt"}
    assert data["dataset"] == {"uri": "s3://data/digits.npz"}
    assert data["output"] == "s3://store/run/convert"


def test_several_models_are_wired_side_by_side_into_a_model_list():
    from mnnpipe.errors import SpecError
    from mnnpipe.kfp.interface import step_interface
    from mnnpipe.kfp.launcher import ArtifactRef, bind_spec

    iface = step_interface("benchmark")
    fp32 = ArtifactRef(uri="", path="", metadata={"mnnpipe_uri": "s3://store/convert/model.mnn", "format": "mnn"})
    int8 = ArtifactRef(uri="", path="", metadata={"mnnpipe_uri": "s3://store/quantize/model.mnn", "format": "mnn"})
    spec = {"models": [{"label": "fp32", "model": {}}, {"label": "int8", "model": {}}, {"label": "source", "model": {"uri": "s3://m/1/model.pt"}}]}

    data = bind_spec(spec, ref_fields=iface.ref_inputs, artifacts={"models_item0": fp32, "models_item1": int8}, uris={}, item_inputs=iface.item_inputs)

    assert [m["model"]["uri"] for m in data["models"]] == ["s3://store/convert/model.mnn", "s3://store/quantize/model.mnn", "s3://m/1/model.pt"]
    assert {"models_item0", "models_item1", "models_item2", "models_item3"} <= {name for name, *_ in iface.item_inputs}
    with pytest.raises(SpecError, match=r"models_item3: an artifact is connected for item 3 of spec.models, which has 3 item\(s\)"):
        bind_spec(spec, ref_fields=iface.ref_inputs, artifacts={"models_item3": int8}, uris={}, item_inputs=iface.item_inputs)


def test_container_launcher_reads_executor_input_and_writes_executor_output(tmp_path):
    # Arrange: an executor input as KFP's backend renders it for '{{$}}'.
    from mnnpipe.kfp.launcher import run_executor_input
    from mnnpipe.specs import StepResult

    seen = {}

    def fake_launch(step, spec, **kw):  # the step itself is covered end to end in integration
        seen.update(step=step, spec=spec, **kw)
        return StepResult(kind=step), {"metrics": {"accuracy": 0.9}}

    out_file = tmp_path / "executor_output.json"
    executor_input = {
        "inputs": {
            "parameterValues": {"spec": "{}", "model_uri": "", "output_uri": "s3://b/run/convert"},
            "artifacts": {"model": {"artifacts": [{"uri": "minio://root/up/model", "metadata": {"mnnpipe_uri": "s3://b/x.mnn"}}]}},
        },
        "outputs": {"artifacts": {"metrics": {"artifacts": [{"uri": "s3://root/t/metrics"}]}}, "outputFile": str(out_file)},
    }

    # Act
    run_executor_input("convert", executor_input, launch_fn=fake_launch)

    # Assert
    assert seen["artifacts"]["model"].path == "/minio/root/up/model"
    assert seen["output_paths"] == {"metrics": "/s3/root/t/metrics"}
    assert seen["output_uri"] == "s3://b/run/convert" and seen["uris"] == {}
    written = json.loads(out_file.read_text())
    assert written["artifacts"]["metrics"]["artifacts"][0]["metadata"] == {"accuracy": 0.9}


def test_typed_parameters_beside_the_json_spec_override_its_fields(tmp_path):
    from mnnpipe.kfp.components import component_interface, make_component
    from mnnpipe.kfp.launcher import run_executor_input

    seen = {}

    def fake_launch(step, spec, **kw):
        from mnnpipe.specs import StepResult

        seen.update(spec=spec)
        return StepResult(kind=step), {}

    params = {"spec": json.dumps({"num_samples": 8, "opset": 17}), "num_samples": 3, "output_uri": "s3://b/c"}  # opset unset: kept
    run_executor_input("convert", {"inputs": {"parameterValues": params}, "outputs": {}}, launch_fn=fake_launch)

    assert seen["spec"] == {"num_samples": 3, "opset": 17}
    settings = dict(component_interface("quantize").settings)
    assert settings["max_accuracy_drop"] == "float" and settings["mode"] == "str" and settings["calibration_samples"] == "int"
    inputs = make_component("quantize").component_spec.inputs
    assert inputs["max_accuracy_drop"].type == "Float" and inputs["max_accuracy_drop"].optional


def test_gate_budget_checks_drop_in_percentage_points_and_floor():
    from mnnpipe.steps.gate import Spec, evaluate

    base = {"output": "s3://bucket/released/x", "candidate": {"uri": "s3://bucket/runs/m.mnn"}}
    spec = Spec(**base, metric="candidate/top1", reference_metric="fp32_accuracy", max_drop=1.0, min_value=0.5,
                candidate_metrics={"candidate/top1": 0.95}, reference_metrics={"fp32_accuracy": 0.955})
    value, ref, drop, problems = evaluate(spec)
    assert problems == [] and abs(drop - 0.5) < 1e-9  # 0.5 points of top-1, within 1 point
    over = spec.model_copy(update={"candidate_metrics": {"candidate/top1": 0.94}})
    assert evaluate(over)[3] != []  # 1.5 points worse
    low = Spec(**base, metric="m", min_value=0.5, candidate_metrics={"m": 0.4})
    assert evaluate(low)[3] != []
