"""Run one MNN command-line tool inside this (throw-away) process.

Usage: ``python _mnn_worker.py {mnnconvert|mnnquant} ARG...``

Why a separate process: the C++ converter and quantizer can abort or segfault, which would kill
the caller. Why this file is run by path and imports only ``_tools``: importing ``MNN.tools`` starts
a telemetry logger that pip-installs packages at run time, and importing the ``mnnpipe`` package is
not needed here. The tool's log goes to this process's stdout/stderr (the parent captures them);
the outcome is the exit status: 0 when the tool reported success, 3 when it returned a false value,
the signal number (negated by Python's subprocess) when the C++ crashed.
"""

from __future__ import annotations

import sys

_TOOLS = ("mnnconvert", "mnnquant")


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in _TOOLS:
        print(f"usage: _mnn_worker.py {{{'|'.join(_TOOLS)}}} ARG...", file=sys.stderr)
        return 2
    import _tools  # the MNN wheel's extension module; never MNN.tools

    tool = argv[0]
    # The extension expects ONE list shaped like C's argv (program name first). Passing the
    # arguments as separate strings makes mnnquant abort with std::length_error.
    ok = getattr(_tools, tool)([tool, *argv[1:]])
    sys.stdout.flush()
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
