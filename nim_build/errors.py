"""Error types. Every user-facing error says what is wrong and what to do next, in one line.

UserError (and subclasses) -> exit code 2, no traceback. AccuracyGateError -> exit code 3.
Anything else is an internal error: exit code 1 with a traceback (NIM_BUILD_DEBUG=1 always shows tracebacks).
"""


class NimBuildError(Exception):
    exit_code = 1


class UserError(NimBuildError):
    """Bad input, bad flags, missing prerequisites: the user can fix it."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """An unsupported or inconsistent model config / build option."""


class CheckpointError(UserError, OSError):
    """A model checkpoint that cannot be read (missing file, truncated shard, bad index)."""


class OutputExistsError(UserError, FileExistsError):
    """The output directory exists and --force was not given."""


class BackendUnavailableError(UserError, RuntimeError):
    """The requested engine backend cannot run on this machine."""


class AccuracyGateError(NimBuildError):
    """The quantized checkpoint failed the accuracy gate."""

    exit_code = 3
