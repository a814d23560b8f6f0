"""User-facing errors: printed as one clear message, never as a traceback."""


class UserError(Exception):
    """Bad input or a missing file the user can fix; the message says what and where."""
