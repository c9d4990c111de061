"""The base of every error a user can fix from its message (a config key, a manifest row, a reward change).

The CLI prints these without a traceback and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input, named in the message (file, key or row) with what was expected."""
