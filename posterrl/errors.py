"""The base of every error a user can fix from its message (a config key, a manifest row, a reward change).

The CLI prints these without a traceback and exits with their exit_code (2; 1 for a run a fault
stopped); anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input, named in the message (file, key or row) with what was expected."""

    exit_code = 2  # what the CLI exits with after printing the message


class Interrupted(Exception):
    """The user stopped the run (Ctrl-C); raised at a safe point, after the stage's checkpoint where it has one."""

    exit_code = 130  # as a shell reports a process ended by SIGINT
