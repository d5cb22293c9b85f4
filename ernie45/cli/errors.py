"""Errors the command line prints as one line (the user can fix them), never as a traceback."""

from __future__ import annotations


class UsageError(Exception):
    """A mistake the user can fix; printed as one line."""
