"""`released/<name>/latest.json` under concurrent writers: always a complete release, never backwards."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mnnpipe.errors import StoreError
from mnnpipe.release import point_latest, read_latest
from mnnpipe.store import MANIFEST, join, store_for

pytestmark = pytest.mark.integration


def publish_release(root: str, name: str, version: str) -> str:
    prefix = join(root, name, version, "recipe1")
    store = store_for(prefix)
    store.write_bytes(f"model {version}".encode(), join(prefix, "model.mnn"))
    store.write_bytes(json.dumps({"version": version}).encode(), join(prefix, MANIFEST))  # last
    return prefix


@pytest.fixture(params=["local", "s3"])
def release_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "released")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/released"


def test_concurrent_gates_leave_latest_on_the_newest_complete_release(release_root):
    versions = [str(v) for v in range(1, 13)]
    prefixes = {v: publish_release(release_root, "digits", v) for v in versions}
    order = versions[:]
    random.Random(0).shuffle(order)  # an older version may finish last
    seen: list[dict] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            record = read_latest(release_root, "digits")
            if record is not None:
                seen.append(record)
                manifest = join(record["release"], MANIFEST)
                assert store_for(manifest).exists(manifest), f"latest names an incomplete release: {record}"

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            moved = list(pool.map(lambda v: point_latest(release_root, "digits", v, prefixes[v]), order))
    finally:
        stop.set()
        watcher.join()
    final = read_latest(release_root, "digits")
    assert final["version"] == "12" and final["release"] == prefixes["12"].rstrip("/")
    assert moved[order.index("12")] is True  # the newest always lands
    seen_versions = [int(r["version"]) for r in seen]
    assert seen_versions == sorted(seen_versions), "the pointer went backwards"


def test_pointer_refuses_an_incomplete_release(release_root):
    prefix = join(release_root, "digits", "7", "recipe1")
    store_for(prefix).write_bytes(b"half", join(prefix, "model.mnn"))  # no manifest
    with pytest.raises(StoreError, match="no manifest.json"):
        point_latest(release_root, "digits", "7", prefix)
    assert read_latest(release_root, "digits") is None


def test_older_version_does_not_move_latest_back(release_root):
    new = publish_release(release_root, "digits", "v10")
    old = publish_release(release_root, "digits", "v9")
    assert point_latest(release_root, "digits", "v10", new) is True
    assert point_latest(release_root, "digits", "v9", old) is False
    assert read_latest(release_root, "digits")["version"] == "v10"
