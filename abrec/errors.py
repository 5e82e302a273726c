"""Errors shared by every command: kept apart from abrec.cli so `python -m abrec.cli` sees one class."""


class UsageError(Exception):
    """A user mistake: printed as `abrec CMD: error: ...` with exit status 2, no traceback."""
