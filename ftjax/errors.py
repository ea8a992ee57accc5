"""The one exception type that reaches a user as a single line."""


class FtjaxError(Exception):
  """A problem with the user's input (config, override, checkpoint, data file).

  The message is one line that names what is wrong and what to change. Entry points print it
  without a traceback and exit non-zero; anything else that escapes is a bug and keeps its
  traceback.
  """
