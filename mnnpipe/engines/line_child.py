"""A child process spoken to in lines of JSON, both ends: the measuring server (engines.measure /
engines.measure_server) and the confined torch process (engines.confined_torch) use it.

    child = LineChild([sys.executable, "-m", "some.module", ...], env=env, cleanup=tmp.cleanup)
    reply = child.call({"op": "run", ...}, timeout_s=60)        # NoReply when none comes
    child.close()

    # in the child (`python -m some.module ... REPLY_FD`):
    sys.exit(serve_lines(int(sys.argv[-1]), handle))            # handle(request) -> reply

Requests go over the child's stdin, one line each; replies come back, one line each, over a pipe
whose write end the child gets as its last argument. A model the child runs (after confining
itself, or in a process forked from it that closes that descriptor) can print what it likes but
cannot forge a reply. The child's stdout and stderr go to a log whose last lines explain a failure.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import weakref
from typing import Any, Callable, NoReturn, Sequence

from mnnpipe.errors import InputError, MnnpipeError, SpecError, StepFailed, ToolError

__all__ = ["LineChild", "NoReply", "confine", "error_reply", "raise_reported", "serve_lines", "warn_if_unconfined"]

_TAIL = 4  # log lines quoted in an error
_ERRORS: dict[str, type[MnnpipeError]] = {"InputError": InputError, "SpecError": SpecError, "StepFailed": StepFailed, "ToolError": ToolError}


class NoReply(Exception):
    """The child did not take the request (`sent` False: it has exited) or sent no reply line."""

    def __init__(self, *, sent: bool, timed_out: bool, log_tail: str) -> None:
        super().__init__(log_tail)
        self.sent = sent
        self.timed_out = timed_out
        self.log_tail = log_tail


class LineChild:
    """The parent's end: start the child, send a request line, wait for its reply line."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str], cleanup: Callable[[], object] | None = None) -> None:
        """Start `argv` + [reply fd]; `cleanup` runs after the child has exited (on close or GC)."""
        self._log = tempfile.TemporaryFile()
        reply_r, reply_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [*argv, str(reply_w)],
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(reply_w,),
            )
        finally:
            os.close(reply_w)
        self._replies = os.fdopen(reply_r, "rb")
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._replies, self._log, cleanup)

    def log_tail(self) -> str:
        if self._log.closed:
            return "no log output"
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-_TAIL:]) or "no log output"

    def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one request, return the reply. Without a reply within `timeout_s` the child is closed."""
        import select

        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
        except (OSError, ValueError):  # BrokenPipeError; ValueError: closed before
            raise NoReply(sent=False, timed_out=False, log_tail=self.log_tail()) from None
        ready, _, _ = select.select([self._replies], [], [], timeout_s)
        line = self._replies.readline() if ready else b""
        if not line:
            tail = self.log_tail()
            self.close()
            raise NoReply(sent=True, timed_out=not ready, log_tail=tail)
        return json.loads(line)

    def close(self) -> None:
        self._finalizer()


def _shutdown(proc: subprocess.Popen, replies: Any, log: Any, cleanup: Callable[[], object] | None) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()  # end of requests: the child exits
        proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    replies.close()
    log.close()
    if cleanup is not None:
        cleanup()


def raise_reported(error: dict[str, str]) -> NoReturn:
    """Raise the error a child reported (`error_reply`) as the same class (ToolError if unknown)."""
    raise _ERRORS.get(error["type"], ToolError)(error["message"])


_warned_confinement = False


def warn_if_unconfined(confinement: dict[str, Any]) -> None:
    """Warn once per process when a child reports (`confine`) that it is only partly confined."""
    global _warned_confinement
    if confinement.get("complete") or _warned_confinement:
        return
    _warned_confinement = True
    logging.getLogger("mnnpipe.sandbox").warning("untrusted models run only partly confined here: %s", confinement.get("describe", "unknown"))


# --------------------------------------------------------------------------- the child's end


def serve_lines(reply_fd: int, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """One request per line of stdin until it closes; `handle`'s reply as one line on `reply_fd`."""
    replies = os.fdopen(reply_fd, "w")
    for line in sys.stdin:
        replies.write(json.dumps(handle(json.loads(line))) + "\n")
        replies.flush()
    return 0


def error_reply(exc: MnnpipeError) -> dict[str, Any]:
    """What `raise_reported` raises again in the parent."""
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def confine(writable: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """mnnpipe.sandbox.confine this process (ToolError where that fails); the report for `warn_if_unconfined`."""
    from mnnpipe import sandbox

    try:
        confinement = sandbox.confine(writable)
    except sandbox.ConfinementError as exc:
        raise ToolError(str(exc)) from None
    return {"complete": confinement.complete, "describe": confinement.describe()}
