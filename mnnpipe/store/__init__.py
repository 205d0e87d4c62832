"""Artifact stores: a local folder (the embedded default) and S3-compatible object storage.

The store is the one seam for I/O and credentials: no step touches boto3 or the filesystem
outside its own work folder. Every artifact is recorded with sha256 and size, downloads are
verified, and an output is published data first, `manifest.json` last, so a reader that trusts
only outputs with a manifest never sees a half-written one.

Modules: `hashing` (sha256 of files and folders), `uris` (joining, splitting and normalising
locations), `local` and `s3` (the two backends; `s3` also reads S3's error codes), `backend`
(the Store interface and `store_for`), `fetching` (fetch and verify) and `lock` (OutputLock).
"""

from __future__ import annotations

from .backend import Store, _s3_store, store_for
from .fetching import fetch, fetch_verified, verify_file
from .hashing import iter_files, sha256_file, sha256_path, sha256_tree
from .local import LocalStore
from .lock import LOCK, OutputLock
from .s3 import S3Settings, S3Store, redact
from .uris import MANIFEST, RESULT, join, local_path, same_location, split_s3

__all__ = [
    "LOCK",
    "MANIFEST",
    "RESULT",
    "LocalStore",
    "OutputLock",
    "S3Settings",
    "S3Store",
    "Store",
    "fetch",
    "fetch_verified",
    "iter_files",
    "join",
    "local_path",
    "redact",
    "same_location",
    "sha256_file",
    "sha256_path",
    "sha256_tree",
    "split_s3",
    "store_for",
    "verify_file",
]
# `_s3_store` (the cached S3 client per settings) is re-exported for tests that clear its cache.
