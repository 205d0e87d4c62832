"""The local artifact store: atomic writes, digests, manifests verified on read."""

import json

import pytest

from mnnpipe.errors import InputError, IntegrityError
from mnnpipe.store import LocalStore, fetch, join, sha256_file, sha256_tree, store_for


def test_put_is_atomic_and_leaves_no_temporaries(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    dest = tmp_path / "out" / "a" / "model.bin"
    LocalStore().put(src, str(dest))
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["model.bin"]


def test_write_if_absent_has_one_winner(tmp_path):
    store = LocalStore()
    uri = str(tmp_path / "pointer.json")
    assert store.write_bytes(b"first", uri, if_absent=True) is True
    assert store.write_bytes(b"second", uri, if_absent=True) is False
    assert (tmp_path / "pointer.json").read_bytes() == b"first"


def test_file_uri_and_plain_path_are_the_same_store(tmp_path):
    (tmp_path / "f.txt").write_text("hi")
    assert store_for(f"file://{tmp_path}/f.txt").read_bytes(f"file://{tmp_path}/f.txt") == b"hi"
    assert LocalStore().list(str(tmp_path)) == [f"{tmp_path}/f.txt"]


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        fetch(str(tmp_path / "absent.pt"), tmp_path)


def test_fetch_verifies_against_sibling_manifest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    model = out / "model.mnn"
    model.write_bytes(b"original bytes")
    manifest = {"artifacts": {"model.mnn": {"uri": str(model), "sha256": sha256_file(model), "size": model.stat().st_size}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert fetch(str(model), tmp_path / "dl") == model

    model.write_bytes(b"tampered bytes")  # same size, different content
    with pytest.raises(IntegrityError, match="sha256"):
        fetch(str(model), tmp_path / "dl")


def test_tree_digest_changes_with_content_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"1")
    first = sha256_tree(tmp_path)
    (tmp_path / "a" / "1.png").write_bytes(b"2")
    second = sha256_tree(tmp_path)
    (tmp_path / "a" / "1.png").rename(tmp_path / "a" / "2.png")
    assert len({first, second, sha256_tree(tmp_path)}) == 3


def test_join_normalises_slashes():
    assert join("s3://b/p/", "/x/", "y") == "s3://b/p/x/y"
