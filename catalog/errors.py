"""The one exception type saecat raises for problems a user can fix.

The CLI prints its message on one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class SaecatError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message folded onto one line (libraries put the useful part on line 2)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
