"""Errors that nmjax reports to a person as one clear line (main.py prints them and exits 2)."""


class NmjaxError(Exception):
  """Base class: the message is a complete, one-line explanation."""


class ConfigError(NmjaxError, ValueError):
  """A config field holds a value outside what is allowed; the message names field and choices."""


class DataError(NmjaxError):
  """A dataset is missing or malformed; the message names the file and the command that fixes it."""


class TrainingError(NmjaxError):
  """Training cannot go on (e.g. a non-finite loss); the message names the step and checkpoint."""


class Interrupted(NmjaxError):
  """The user stopped the run (Ctrl-C): what was committed is kept; the message says how to go
  on. main.py exits with `exit_code` (130, the shell's code for SIGINT)."""
  exit_code = 130


def os_error_in(error: BaseException | None, errnos: tuple[int, ...]) -> OSError | None:
  """The first OSError with one of `errnos` in the chain of `error`'s causes (libraries such as
  TFDS or orbax re-raise a full disk or a read-only folder inside their own exceptions)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in errnos:
      return error
    error = error.__cause__ or error.__context__
  return None
