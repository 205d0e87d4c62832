"""Run one MNN command-line tool inside this (throw-away) process.

Usage: ``python _mnn_worker.py {mnnconvert|mnnquant} ARG...``

Why a separate process: the C++ converter and quantizer can abort or segfault, which would kill
the caller. Why this file is run by path and imports only ``_tools``: importing ``MNN.tools`` starts
a telemetry logger that pip-installs packages at run time, and importing the ``mnnpipe`` package is
not needed here. The tool's log goes to this process's stdout/stderr (the parent captures them);
the outcome is the exit status: 0 when the tool reported success, 3 when it returned a false value,
4 when MNNPIPE_CONFINE=required and the process cannot be confined (mnnpipe/sandbox.py: it may
write only the folders in MNNPIPE_TOOL_WRITABLE, no sockets), the signal number (negated by
Python's subprocess) when the C++ crashed.
"""

from __future__ import annotations

import sys

_TOOLS = ("mnnconvert", "mnnquant")


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in _TOOLS:
        print(f"usage: _mnn_worker.py {{{'|'.join(_TOOLS)}}} ARG...", file=sys.stderr)
        return 2
    import _tools  # the MNN wheel's extension module; never MNN.tools

    if not _confine():
        return 4
    tool = argv[0]
    # The extension expects ONE list shaped like C's argv (program name first). Passing the
    # arguments as separate strings makes mnnquant abort with std::length_error.
    ok = getattr(_tools, tool)([tool, *argv[1:]])
    sys.stdout.flush()
    return 0 if ok else 3


def _confine() -> bool:
    """Confine this process (mnnpipe/sandbox.py, loaded by path: no package import) to writing the
    folders in MNNPIPE_TOOL_WRITABLE, without sockets. False when MNNPIPE_CONFINE=required and
    that is not possible here."""
    import importlib.util
    import os
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_mnnpipe_sandbox", Path(__file__).resolve().parents[1] / "sandbox.py")
    assert spec is not None and spec.loader is not None
    sandbox = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sandbox  # its dataclasses look their module up there
    spec.loader.exec_module(sandbox)
    writable = [p for p in os.environ.get("MNNPIPE_TOOL_WRITABLE", "").split(os.pathsep) if p]
    try:
        confinement = sandbox.confine(writable)
    except sandbox.ConfinementError as exc:
        print(f"mnnpipe: {exc}", file=sys.stderr)
        return False
    if not confinement.complete:
        print(f"mnnpipe: warning: the MNN tool runs only partly confined: {confinement.describe()}", file=sys.stderr)
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
