"""Errors that nmjax reports to a person as one clear line (main.py prints them and exits 2)."""


class NmjaxError(Exception):
  """Base class: the message is a complete, one-line explanation."""


class ConfigError(NmjaxError, ValueError):
  """A config field holds a value outside what is allowed; the message names field and choices."""


class DataError(NmjaxError):
  """A dataset is missing or malformed; the message names the file and the command that fixes it."""


class TrainingError(NmjaxError):
  """Training cannot go on (e.g. a non-finite loss); the message names the step and checkpoint."""
