"""Keeping what failed verification, for inspection, outside anything that gets published.

`mnnpipe run --keep-failed [DIR]` sets MNNPIPE_KEEP_FAILED for the run; a step whose candidate
model fails its check copies the files that explain the failure (the model, its source graph, a
divergence table) into `DIR/<step>-<UTC time>-FAILED/` with a FAILED.txt stating why, and the
one-line error names that folder. Nothing goes under the spec's `output`: a failed model is never
a published artifact.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

__all__ = ["ENV", "keep_failed"]

ENV = "MNNPIPE_KEEP_FAILED"


def keep_failed(step: str, files: dict[str, Path], reason: str) -> Path | None:
    """Copy `files` (name in the folder -> local file) into a marked folder; None when not asked to."""
    root = os.environ.get(ENV)
    if not root:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = Path(root) / f"{step}-{stamp}-{uuid.uuid4().hex[:6]}-FAILED"
    dest.mkdir(parents=True)
    for name, src in files.items():
        if src.is_file():
            shutil.copyfile(src, dest / name)
    (dest / "FAILED.txt").write_text(f"This {step} output FAILED its check and was not published.\n{reason}\n")
    return dest
