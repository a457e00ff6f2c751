"""The one exception type for mistakes a user can fix.

``curate`` prints a :class:`UserError` as one line (``curate: <message>``, exit 2) and lets every
other exception keep its traceback: a bug must stay visible, so the command line never catches
``ValueError`` or ``Exception`` wholesale. Each message names the file, key or row at fault.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad setting or a damaged pool: the message says which file/key/row and what to do."""


class DamagedError(UserError):
    """A pool file is missing, truncated or unreadable; the message names it and the stage to re-run."""


class LockedError(UserError):
    """Another writer holds the pool (or the release folder); the message names the holder."""
