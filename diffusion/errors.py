"""Errors caused by the user's input. Entry points print their message, without a traceback."""


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it."""


class ConfigError(UserError):
    """A config key, type or value that cannot work."""


class DataError(UserError):
    """A dataset that is missing, empty or unreadable."""
