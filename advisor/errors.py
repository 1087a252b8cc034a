"""User-facing errors: each message names what is wrong and how to fix it.

Code anywhere in Tunewise raises a `TunewiseError` (or a subclass) for a
mistake the user can correct: a bad setting, an unknown model, a malformed
dataset row. The CLI prints it as `error: ...` and exits 2; the wizard shows
it in the page. Anything else is a bug and is reported as one.
"""

from __future__ import annotations


class TunewiseError(Exception):
    """A problem with the user's input, with a message that says how to fix it."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


class ModelNotFound(TunewiseError):
    """The model name is not in the catalogue, not a local config, and not reachable on the hub."""


class DatasetError(TunewiseError):
    """The dataset is missing, unreadable, or has a malformed row (the message names it)."""


def user_message(exc: BaseException) -> str:
    """What a page shows for an exception: TunewiseError messages as they are (they name the field and
    the fix); anything else as a short bug report without the traceback."""

    if isinstance(exc, TunewiseError):
        return str(exc)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"{exc.filename or 'file'}: {exc.strerror or exc}. Check the path and try again."
    return (f"Something went wrong ({type(exc).__name__}: {exc}). This is a bug in Tunewise, not in your input; "
            "the details are in the server log.")
