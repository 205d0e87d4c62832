"""Shared sub-specs: valid inputs pass, invalid ones fail naming the field and what was expected."""

import pytest
from pydantic import ValidationError

from mnnpipe.specs import DatasetRef, ModelRef, Preprocess, TensorSpec, Tolerance, check_uri


@pytest.mark.parametrize(
    "uri, fmt",
    [("m.pt", "torchscript"), ("s3://bucket-a/x/m.pt2", "torch-export"), ("file:///tmp/m.onnx", "onnx"), ("/a/b.mnn", "mnn")],
)
def test_model_format_inferred_from_extension(uri, fmt):
    assert ModelRef(uri=uri).format == fmt


def test_state_dict_needs_factory():
    with pytest.raises(ValidationError, match="needs `factory`"):
        ModelRef(uri="w.pth")
    ref = ModelRef(uri="w.pth", factory="mnnpipe.models:digits_cnn", factory_kwargs={"width": 0.5})
    assert ref.format == "state-dict" and ref.is_torch


@pytest.mark.parametrize("factory", ["nocolon", "a.b:", ":x", "a b:c", "a:b;rm"])
def test_factory_must_be_module_colon_callable(factory):
    with pytest.raises(ValidationError, match="pkg.module:callable"):
        ModelRef(uri="w.pth", factory=factory)


def test_unknown_extension_with_auto_format_is_rejected():
    with pytest.raises(ValidationError, match="set format explicitly"):
        ModelRef(uri="model.bin")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("http://x/y.pt", "unsupported scheme"),
        ("s3://Bad_Bucket/m.pt", "invalid S3 bucket"),
        ("../../etc/passwd.pt", "'..'"),
        ("s3://bucket-a/../x.pt", "'..'"),
        ("", "non-empty"),
    ],
)
def test_bad_uris(uri, message):
    with pytest.raises(ValueError, match=message):
        check_uri(uri)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ModelRef(uri="m.pt", colour="red")


def test_specs_are_frozen():
    ref = ModelRef(uri="m.pt")
    with pytest.raises(ValidationError):
        ref.uri = "other.pt"


def test_dataset_needs_uri_except_builtin():
    assert DatasetRef(format="sklearn-digits").uri is None
    with pytest.raises(ValidationError, match="uri is required"):
        DatasetRef(format="image-folder")


def test_preprocess_per_channel_values():
    p = Preprocess(channels="RGB", mean=(0.5,), std=(0.25, 0.5, 1.0))
    assert p.per_channel("mean") == (0.5, 0.5, 0.5)
    with pytest.raises(ValidationError, match="mean must have 1 value for channels 'GRAY', got 3"):
        Preprocess(channels="GRAY", mean=(0.1, 0.2, 0.3))
    with pytest.raises(ValidationError, match="std values must all be > 0"):
        Preprocess(std=(0.0,))


@pytest.mark.parametrize(
    "shape, message",
    [((), "1 to 8 dimensions"), ((1, 0, 8), "dimensions must be >= 1"), ((1, 3, 65536, 65536), "elements")],
)
def test_absurd_shapes_rejected(shape, message):
    with pytest.raises(ValidationError, match=message):
        TensorSpec(shape=shape)


def test_long_1d_and_float64_inputs_are_accepted():
    assert TensorSpec(shape=(220_000,), dtype="float64").shape == (220_000,)


def test_tensor_range_must_be_ordered():
    with pytest.raises(ValidationError, match="low < high"):
        TensorSpec(shape=(1, 4), range=(1.0, 0.0))


def test_tolerance_bounds():
    with pytest.raises(ValidationError):
        Tolerance(min_cosine=1.5)
    assert Tolerance().min_top1_agreement == 0.99
