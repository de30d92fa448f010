"""Errors a user can fix. The CLI prints them as one line and exits with code 2 (no traceback)."""


class UserError(Exception):
    """Bad input: a file, key or value the user gave. The message names it and says what was expected."""

    exit_code = 2


class ConfigError(UserError):
    """A job or search-space file, or a key=value override, does not fit the JobConfig schema."""
