"""Errors that are the user's to fix. The CLI prints their message (no traceback) and exits non-zero."""


class LinearizeError(Exception):
    """A problem with the user's input or environment; the message names it and says how to fix it."""
