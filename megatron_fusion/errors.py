"""Which exceptions are the user's to fix (printed as one line) rather than bugs (traceback).

Every user-facing error class derives from ``UserError`` (this module imports nothing, so any
layer can use it); ``user_facing(e)`` is one isinstance check.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user fixes (config, data, files, teachers): one line, no traceback."""


class TeacherDataError(UserError, RuntimeError):
    """Teacher top-K that cannot be used for this run (wrong shard, wrong tokenizer, dead teacher)."""


class DataError(UserError, RuntimeError):
    """Training data that cannot be used (missing file, empty set): names the file or field."""


def user_facing(e: BaseException) -> bool:
    return isinstance(e, (UserError, FileNotFoundError))
