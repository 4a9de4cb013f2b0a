"""The one exception type for mistakes in what a user gave (paths, files, flags, saved runs).

The `controlllm` command prints a `UserError` as one line and exits with status 2; any other
exception is a bug and keeps its traceback. Each module's own error (DataError, AssetError,
TrainingError, CheckpointError) derives from it and from the builtin type callers caught before.
"""


class UserError(Exception):
    """Something the user gave cannot be used; the message says what, which value, and what is allowed."""


class UsageError(UserError, ValueError):
    """A flag or argument does not fit (e.g. a layer index past the model's depth)."""


class CheckpointError(UserError, ValueError):
    """A saved run, delta or checkpoint cannot be loaded: missing, unfinished, corrupt, or saved
    from another base model."""
