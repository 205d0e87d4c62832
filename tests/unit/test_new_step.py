"""A step added in one module gets everything the bundled steps get (issue 14).

tests/support/echo_step.py is a whole step in one file: a Spec, a Result, a run function and one
`register` call. Nothing else in the repository names it, yet it has a command line (`mnnpipe
run|validate|schema echo`, in a real process found through MNNPIPE_STEP_MODULES), a JSON Schema,
a KFP component (container form as component.yaml, lightweight form run on kfp.local), an Airflow
operator, and a section in the recipe wired after the step before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Airflow reads its settings when first imported: the same as tests/unit/test_airflow_operators.py.
os.environ.setdefault("MNNPIPE_TEST_AIRFLOW_HOME", tempfile.mkdtemp(prefix="mnnpipe-airflow-"))
os.environ["AIRFLOW_HOME"] = os.environ["MNNPIPE_TEST_AIRFLOW_HOME"]
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[2] / "dags")
os.environ["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"

import pytest  # noqa: E402

from mnnpipe import catalog  # noqa: E402

MNNPIPE = [sys.executable, "-m", "mnnpipe.cli"]
#: The Spec's own fields (beside kind, schema_version, output).
FIELDS = ("model", "data", "repeat", "note", "padding_bytes", "fail", "seed")


def mnnpipe(*args: str) -> subprocess.CompletedProcess:
    """`mnnpipe ...` as a process with this one's environment (PYTHONPATH, MNNPIPE_STEP_MODULES)."""
    return subprocess.run([*MNNPIPE, *args], capture_output=True, text=True, timeout=120, env=dict(os.environ))


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not really onnx, and the echo step does not mind")
    return path


def test_one_module_adds_a_step_to_the_catalog(echo_step):
    bundled = [n for n in catalog.names() if catalog.get(n).module.startswith("mnnpipe.steps.")]

    step = catalog.get("echo")

    assert "echo" in catalog.names() and "echo" not in bundled
    assert step.module == "echo_step" and step.spec is echo_step.Spec and step.run is echo_step.run
    assert step.hands_on == catalog.HandOff("echo.mnn", "mnn")
    names = catalog.names()
    assert names.index("convert") < names.index("echo") < names.index("gate")  # its stage's place


def test_the_command_line_schemas_validates_and_runs_it_in_a_real_process(echo_step, model, tmp_path, cache_dir):
    spec = tmp_path / "echo.yaml"
    spec.write_text(f"output: {tmp_path / 'out'}\nmodel: {{uri: '{model}'}}\nrepeat: 3\n")

    listed = mnnpipe("steps")
    schema = mnnpipe("schema", "echo")
    validated = mnnpipe("validate", "echo", "--spec", str(spec))
    ran = mnnpipe("-q", "run", "echo", "--spec", str(spec), "--set", "note=hello")

    assert "echo" in listed.stdout.split(), listed.stderr
    assert schema.returncode == 0, schema.stderr
    properties = json.loads(schema.stdout)["properties"]
    assert properties["kind"]["const"] == "echo" and set(FIELDS) <= set(properties)
    assert [name for name, prop in properties.items() if not prop.get("description")] == []
    assert json.loads(schema.stdout) == echo_step.Spec.model_json_schema()
    assert validated.returncode == 0 and json.loads(validated.stdout)["repeat"] == 3, validated.stderr
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["kind"] == "echo" and result["note"] == "hello" and result["size_bytes"] == 3 * model.stat().st_size
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["step"] == "echo" and set(manifest["artifacts"]) == {"echo.mnn"}
    assert (tmp_path / "out" / "echo.mnn").read_bytes() == model.read_bytes() * 3


def test_a_bad_spec_of_the_new_step_exits_2_in_a_real_process(echo_step, model, tmp_path):
    spec = tmp_path / "echo.yaml"
    spec.write_text(f"output: {tmp_path / 'out'}\nmodel: {{uri: '{model}'}}\nrepeat: 0\n")

    proc = mnnpipe("run", "echo", "--spec", str(spec))

    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: repeat: Input should be greater than or equal to 1"]


def test_its_kfp_component_yaml_has_inputs_from_its_spec(echo_step):
    from kfp import components

    from mnnpipe.kfp.components import component_yaml

    comp = components.load_component_from_text(component_yaml("echo", "localhost/mnnpipe-step:test"))

    inputs, outputs = comp.component_spec.inputs, comp.component_spec.outputs
    assert inputs["spec"].type == "String"
    assert inputs["model"].type.startswith("system.Model") and inputs["model"].optional
    assert inputs["data"].type.startswith("system.Dataset") and inputs["data"].optional
    assert {"model_uri", "data_uri", "output_uri"} <= set(inputs)
    assert inputs["repeat"].type == "Integer" and inputs["fail"].type == "String"  # typed settings beside the JSON spec
    assert {"output_model", "metrics", "report"} == set(outputs)  # it hands a model on
    container = comp.component_spec.implementation.container
    assert container.image == "localhost/mnnpipe-step:test"
    assert container.command == ["mnnpipe", "kfp-launch"] and container.args[0] == "echo"
    assert "padding_bytes" in comp.description  # the Spec's fields, documented


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom:RuntimeWarning")
def test_its_lightweight_component_runs_on_kfp_local(echo_step, model, tmp_path, cache_dir, monkeypatch):
    from kfp import local
    from kfp.local.config import LocalExecutionConfig

    from mnnpipe.kfp.components import make_component

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.chdir(tmp_path)
    saved = LocalExecutionConfig.instance
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))
    try:
        component = make_component("echo", "lightweight", "localhost/mnnpipe-step:test")
        task = component(spec=json.dumps({"repeat": 2}), model_uri=str(model), output_uri=str(tmp_path / "out"), note="kfp")
    finally:
        LocalExecutionConfig.instance = saved

    assert Path(task.outputs["output_model"].path).read_bytes() == model.read_bytes() * 2
    assert task.outputs["output_model"].metadata["mnnpipe_uri"] == str(tmp_path / "out" / "echo.mnn")
    assert task.outputs["metrics"].metadata["size_bytes"] == 2 * model.stat().st_size
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["step"] == "echo" and manifest["spec"]["note"] == "kfp"


def test_its_airflow_operator_documents_and_runs_it(echo_step, model, tmp_path, cache_dir):
    pytest.importorskip("airflow.sdk", reason="needs the airflow extra")
    from mnnpipe.airflow.operators import MnnStepOperator, operator_class

    cls = operator_class("echo")
    op = cls(task_id="echo", spec={"model": {"uri": str(model)}, "output": str(tmp_path / "out")}, execution="in_process")
    result = op.execute({})

    assert cls.__name__ == "MnnEchoOperator" and issubclass(cls, MnnStepOperator) and cls.step == "echo"
    assert operator_class("echo") is cls
    for field in FIELDS:
        assert f"``{field}``" in cls.__doc__
    assert result["kind"] == "echo" and result["artifacts"]["echo.mnn"]["size"] == model.stat().st_size
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert op.pod_command(op.validated_spec())[:3] == ["mnnpipe", "run", "echo"]  # execution="kubernetes" runs the same


def test_its_recipe_section_is_wired_after_the_step_before_it(echo_step):
    from mnnpipe.recipe import parse_recipe, plan, recipe_model

    field = recipe_model().model_fields["echo"]
    recipe = {
        "convert": {"inputs": [{"name": "input", "shape": [1, 1, 8, 8]}]},
        "echo": {"repeat": 2},
        "gate": {"metric": "size_bytes", "min_value": 1.0},
    }

    steps = plan(recipe)

    assert not field.is_required()  # optional: a recipe may leave it out
    assert steps.step("echo").wires[0].source == "convert" and steps.step("echo").spec["repeat"] == 2
    assert steps.release.candidate_from == "echo"  # it hands its model on to the release
    with pytest.raises(Exception, match=r"recipe\.echo\.repeat"):
        parse_recipe({**recipe, "echo": {"repeat": 0}})


def test_the_step_is_gone_once_its_test_is_over():
    assert "echo" not in catalog.names()
