"""The one table from error classes to exit codes and the next step a message ends with (README: exit codes).

Messages raised for bad input already say what to fix; errors that come from a running server or from a build's
result get the next thing to run appended here. Exceptions that are not NimBuildError are internal errors: they
are re-raised (exit 1, traceback). NIM_BUILD_DEBUG=1 re-raises every error, with its traceback.
"""

from __future__ import annotations

import errno
import os

from nim_build.errors import AccuracyGateError, HostError, InferenceError, NimBuildError, ServingError, UserError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_GATE, EXIT_SERVING, EXIT_HOST = 0, 1, 2, 3, 4, 5
# OSErrors that are the machine's answer, not a bug: what to do about each.
HOST_ERRNOS = {
    errno.ENOSPC: "free space there or write elsewhere (--out)",
    errno.EDQUOT: "free space there or write elsewhere (--out)",
    errno.EACCES: "write somewhere this user may (--out)",
    errno.EPERM: "write somewhere this user may (--out)",
    errno.EROFS: "write to a writable filesystem (--out)",
}

# (error class, exit code, next step or None); the first row the error is an instance of applies.
TABLE: list[tuple[type[NimBuildError], int, str | None]] = [
    (UserError, EXIT_USAGE, None),
    (AccuracyGateError, EXIT_GATE, None),  # its message names the flags that tune or skip the gate
    (ServingError, EXIT_SERVING, "Triton's log above shows why; start it again with `nim_build serve REPO`"),
    (InferenceError, EXIT_SERVING, None),  # its message is the server's answer, or why it could not be reached
    (HostError, EXIT_HOST, None),
    (NimBuildError, EXIT_INTERNAL, "NIM_BUILD_DEBUG=1 shows a traceback"),
]


def exit_code(error: NimBuildError) -> int:
    return _row(error)[1]


def message(error: NimBuildError) -> str:
    """The one line printed for error: `Error: ...`, ending with the next step when the table gives one."""
    text = " ".join(str(error).split())
    hint = _row(error)[2]
    return f"Error: {text}" + (f" ({hint})" if hint else "")


def _row(error: NimBuildError) -> tuple:
    return next(row for row in TABLE if isinstance(error, row[0]))


def host_error(error: OSError) -> HostError | None:
    """The HostError an OSError from the machine stands for (a full disk, a denied permission), else None."""
    if error.errno not in HOST_ERRNOS:
        return None
    where = f": {error.filename}" if error.filename else ""
    return HostError(f"{os.strerror(error.errno).lower()}{where}; {HOST_ERRNOS[error.errno]}")
