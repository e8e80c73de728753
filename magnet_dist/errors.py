"""User-facing errors: each names the input, what was wrong, and what to do.

The CLI prints them without a traceback and exits with status 2.
"""


class MagnetError(Exception):
    """Base class of every error a user can fix by changing input, config or environment."""


class DataError(MagnetError):
    """A dataset input (file, column, row) is invalid."""


class ConfigError(MagnetError, ValueError):
    """A config file or override is invalid; the message names the key path."""
