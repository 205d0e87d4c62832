"""The error hierarchy. Each class carries the exit code the CLI returns for it.

Messages are one line a person can act on: the field or file, and what was expected.
"""

from __future__ import annotations


class MnnpipeError(Exception):
    """Base of every error mnnpipe raises on purpose."""

    exit_code = 1


class SpecError(MnnpipeError):
    """The spec is invalid: a wrong field, type or value (exit 2)."""

    exit_code = 2


class InputError(MnnpipeError):
    """An input named by the spec is missing, unreadable or not what was declared (exit 2)."""

    exit_code = 2


class StepFailed(MnnpipeError):
    """The step ran but its outcome is unacceptable, e.g. beyond a fidelity budget (exit 1)."""

    exit_code = 1


class ToolError(MnnpipeError):
    """An engine (MNN converter, quantizer, runtime, exporter) failed or crashed (exit 1)."""

    exit_code = 1


class StoreError(MnnpipeError):
    """The artifact store could not be read or written (exit 3), distinct from bad input."""

    exit_code = 3


class IntegrityError(StoreError):
    """An artifact's bytes do not match the sha256 or size recorded for it (exit 3)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters; its type's name when
    the message is empty. For wrapping someone else's exception into one of ours."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
