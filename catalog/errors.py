"""The exception type saecat raises for problems a user can fix, and two kinds of it that the
HTTP server answers with their own status codes.

The CLI prints its message on one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class SaecatError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class NotFound(SaecatError):
    """The SAE or feature named is not in the catalog."""


class CatalogBusy(SaecatError):
    """Another process held the catalog longer than the caller would wait; trying later can work."""


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message folded onto one line (libraries put the useful part on line 2)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
