"""User-facing errors: the command-line entry points print these as one line and exit non-zero."""


class UserError(Exception):
    """Bad input from the user (flag, path, checkpoint, data): reported as one line, no traceback."""


class LitQuantWarning(UserWarning):
    """A warning of lit-quant's own: the scripts print it as one ``<prog>: warning: ...`` line."""
