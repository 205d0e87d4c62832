"""A cached demo run must not pay for importing torch just to find the teacher already trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_existing_teacher_is_found_without_importing_torch(tmp_path: Path) -> None:
    (tmp_path / "teacher.pth").write_bytes(b"weights of an earlier run")
    code = (
        "import sys; from pathlib import Path; from mnnpipe.demo import train_teacher; "
        f"p = train_teacher(Path({str(tmp_path)!r})); "
        "print(p.name, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["teacher.pth", "False"]
