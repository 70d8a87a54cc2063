"""One exception type for every mistake a user can make.

The CLI turns an :class:`LmlabError` into a single line on stderr and a non-zero
exit code; anything else is a bug in lmlab and keeps its traceback.
"""

from __future__ import annotations


class LmlabError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
