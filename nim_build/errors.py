"""Every error class of nim_build. Each also inherits the builtin exception it is a kind of, so callers that know
nothing of nim_build can still catch it (`except FileExistsError`).

Which exit code and which next step each class gets on the command line is one table: nim_build/cli/_errors.py.
UserError and its subclasses are bad input the user can fix (exit 2, one line, no traceback); AccuracyGateError is
a build whose result was refused (exit 3); ServingError and InferenceError are failures of a running server or of
a request to it (exit 4); HostError is the machine refusing (a full disk, a permission denied: exit 5). Any other
exception is an internal error: exit 1 with a traceback.
"""


class NimBuildError(Exception):
    """Base class of every error nim_build raises on purpose."""


class UserError(NimBuildError):
    """Bad input, bad flags, a missing prerequisite: the user can fix it."""


class ConfigError(UserError, ValueError):
    """An unsupported or inconsistent model config, build option or YAML value."""


class CheckpointError(UserError, OSError):
    """A model checkpoint that cannot be read (missing file, truncated shard, bad header or index)."""


class OutputExistsError(UserError, FileExistsError):
    """The output exists and --force was not given."""


class BackendUnavailableError(UserError, RuntimeError):
    """The requested engine backend cannot run on this machine."""


class NativeBuildError(UserError, OSError):
    """The native postprocessing backend cannot be compiled or written here."""


class ServerSetupError(UserError, OSError):
    """Triton cannot be started as asked: no binary, a busy port, a directory that is not a model repository."""


class AccuracyGateError(NimBuildError, RuntimeError):
    """The quantized checkpoint computes too different a function from the original model."""


class ServingError(NimBuildError, RuntimeError):
    """Triton did not become ready, stopped answering, or exited abnormally."""


class InferenceError(NimBuildError, ConnectionError):
    """A request to the server failed: it answered with an error, or could not be reached."""


class ResponseTimeout(InferenceError):
    """The server did not answer within the client's timeout (dead, or busy: supervision tells them apart)."""


class HostError(NimBuildError, OSError):
    """The machine refused: no space left on a device, a permission denied, a read-only filesystem."""


QUEUE_FULL = "the engine's queue is full"  # how tensorrt_llm's refusal beyond its max_queue_size begins
TRITON_QUEUE_FULL = "Exceeds maximum queue size"  # Triton's, when a dynamic batcher's own queue is full


def is_queue_full(message: str) -> bool:
    """Whether an error says a queue was full: a server at capacity, not a broken one (the OpenAI API answers 503,
    serve's health probe counts it as an answer)."""
    return QUEUE_FULL in message or TRITON_QUEUE_FULL in message
