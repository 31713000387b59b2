"""Errors a user can fix, as opposed to bugs.

A `UserError` is bad input, a missing file or extra, refused settings, too few slides for the folds, a
server that stayed down past the retry budget: every console command and recipe prints it as one line
`error: ...` on stderr and exits non-zero. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake or condition the user can fix; its message names the file or key and the fix."""
