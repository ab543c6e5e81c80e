"""The one exception type saecat raises for problems a user can fix.

The CLI prints its message on one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class SaecatError(Exception):
    """A problem with the user's input or environment, stated in one line."""
