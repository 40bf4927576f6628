"""Base exception types shared across stages.

Every stage raises a subclass of :class:`HistoddError` with a one-line message that names the
file (or object) and the problem, so CLIs can print it and exit non-zero without a traceback.
"""


class HistoddError(Exception):
    """Base class of every error this library raises on purpose."""


class InputError(HistoddError):
    """Bad user input: a file that is missing, unreadable, or of the wrong shape or kind."""


class ConfigError(HistoddError):
    """An invalid configuration value."""
