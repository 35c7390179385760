"""Errors caused by the user's input. Entry points print their message, without a traceback."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it."""


class ConfigError(UserError):
    """A config key, type or value that cannot work."""


class DataError(UserError):
    """A dataset that is missing, empty or unreadable."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """In an entry point: print a UserError's message (no traceback) and exit with status 2."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
