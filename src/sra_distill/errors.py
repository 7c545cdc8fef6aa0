"""The errors that mean "what you gave cannot be used", as opposed to a bug.

The `sra` command prints a `UserError` as one line naming the problem (exit status 2); any other exception keeps
its traceback, so an internal error is never mistaken for a bad setting. Library callers can catch `UserError` for
all of them, or one kind:

* `ConfigError`: a setting or command-line argument (the message names the key or option);
* `RunFolderError`: an output_dir that cannot be used as asked (held by another run, holds another run, changed
  settings on resume);
* `DataError`: a record or data file (the message names the file, the 1-based line and the field);
* `ModelSourceError`: a model or tokenizer that exists but cannot be used as given (a slow tokenizer, a vocabulary
  larger than the model's embeddings, an unknown architecture);
* `NotFoundError`: a file, folder, model or tokenizer that is not there.

They derive from `ValueError` (and `NotFoundError` also from `FileNotFoundError`), which the code raised before
they existed, so `except ValueError` in callers keeps working. The module imports nothing heavy: the CLI reads it
before torch loads.
"""

from __future__ import annotations

import signal
from pathlib import Path


class UserError(ValueError):
    """Something the user gave (a setting, argument, file, record, model or tokenizer) cannot be used."""


class ConfigError(UserError):
    """A configuration key or value that cannot be used; the message names the key."""


class RunFolderError(ConfigError):
    """The output_dir cannot be used as asked (held by another run, holds another run, changed settings)."""


class DataError(UserError):
    """A record that cannot be used; the message names the file, the 1-based line and the field."""


class ModelSourceError(UserError):
    """A model or tokenizer that was found but cannot be used as given."""


class NotFoundError(UserError, FileNotFoundError):
    """A file, folder, model or tokenizer the user named is not there."""


class RunStopped(Exception):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint; `exit_code` is 128 + the signal number. Not a
    user error: the CLI exits with that code, quietly (the engine printed how to continue)."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        self.signum, self.checkpoint, self.step = signum, Path(checkpoint), step
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")
