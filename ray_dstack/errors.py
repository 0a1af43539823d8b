"""Errors that the CLI turns into a readable message and an exit code (never a traceback)."""

from __future__ import annotations


class RayDstackError(Exception):
    """A failure the user can act on. `str(err)` is the whole message."""

    exit_code = 1


class UsageError(RayDstackError):
    """Bad input on the command line or in a file: exit code 2."""

    exit_code = 2
