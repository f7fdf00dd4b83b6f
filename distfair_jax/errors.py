"""Error types shared by the whole package.

``InputError`` is raised for bad user input (a malformed data file, a config key that does not
exist, a checkpoint with a missing tensor, ...). Its message is a single line naming the file, the
field and what was expected; the CLI prints it and exits with code 2 without a traceback.
"""

from __future__ import annotations


class InputError(ValueError):
  """Bad input from the user: one line naming the file, the field and what was expected."""

  def __init__(self, message: str):
    message = " ".join(str(message).split())  # always one line
    super().__init__(message)
