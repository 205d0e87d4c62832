"""The package's layers and its freedom from import cycles, as declared in pyproject.toml
([tool.importlinter]): cli > kfp | airflow > demo > searching > local > recipe > steps > runner > context > store | catalog
> specs | errors; steps never import the runner; no cycles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert "3 kept, 0 broken" in proc.stdout, proc.stdout[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:]
